"""Benchmark the streaming loader (train.data.Batches, not in memory) against raw Zarr chunk reads.

    python benchmarks/streaming.py [--encoder uni2h] [--samples 3] [--bins 512] [--batch-size 16]
        [--epochs 7] [--workdir /tmp/featcache-bench-stream] [--out benchmarks/results/streaming-cpu.jsonl]

Builds (once, cached in --workdir) a dataset of --samples synthetic sections of --bins² bins and
a feature store with --encoder's token shape (random float16 values: a ViT's tokens compress
about as badly, benchmarks/RESULTS.md), then times, on the same patches:

* raw: every chunk of tokens, counts, library sizes and mask read with zarr in one thread, nothing else;
* streaming: shuffled epochs of train.data.Batches — chunk-aligned reads through Dask (two blocks
  decoded at a time), the finiteness check, the target transform, the shuffle buffer and batch
  assembly.

The first run builds ~4 GB in --workdir (about 6 minutes on 2 cores).

Reports the median over epochs of tiles/s of each and of their ratio (goal: streaming ≥ 0.8 × raw).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit  # noqa: E402

from featcache.encoders import get_spec  # noqa: E402
from featcache.stores import Workspace  # noqa: E402
from featcache.stores.features import chunk_patches_for, make_identity  # noqa: E402
from featcache.stores.zarrio import open_local  # noqa: E402
from train.data import Batches, FoldInputs, TargetTransform, load_targets  # noqa: E402


def build(workdir: Path, samples: int, bins: int, encoder: str) -> Workspace:
    from featcache.prepare import prepare_dataset
    from featcache.synth import SynthConfig, synthesize

    ws = Workspace.resolve(workdir / "ws")
    names = [f"S{k}" for k in range(1, samples + 1)]
    if not ws.dataset("stream").exists():
        raw = workdir / "raw"
        missing = [n for n in names if not (raw / n).is_dir()]
        if missing:
            synthesize(raw, missing, SynthConfig(rows=bins, cols=bins, seed=5))
        prepare_dataset("stream", {n: str(raw / n) for n in names}, workspace=ws.root, show_progress=False)
    store = ws.feature_store("stream", encoder, random=True)
    if not store.is_complete():
        spec, ds = get_spec(encoder), ws.open_dataset("stream")
        chunk = chunk_patches_for(spec.grid, spec.dim)
        identity = make_identity(
            spec=spec.describe(),
            weights="random:benchmark",
            prefix_tokens=0,
            dataset=ds.meta,
            chunk=chunk,
            compute={"precision": "synthetic"},
            codec="zstd1",
            layout="channel-first",
        )
        root = store.open_or_create(
            identity, {"benchmark": True}, {s: ds.origins(s) for s in ds.samples}, overwrite=True
        )
        rng = np.random.default_rng(0)
        for s in ds.samples:
            tokens = root[s]["tokens"]
            for c in range(store.n_chunks(s)):
                a, b = c * chunk, min((c + 1) * chunk, tokens.shape[0])
                tokens[a:b] = rng.normal(size=(b - a, *tokens.shape[1:])).astype(np.float16)
                root[s]["pooled"][a:b] = 0.0
                store.mark_done(s, c)
    return ws


def raw_reads(ws: Workspace, store, samples) -> float:
    """tiles/s of reading every chunk of tokens, counts, library size and mask, nothing else."""
    feats, targets = store.group("r"), open_local(ws.dataset("stream").targets_path)
    t, n = time.perf_counter(), 0
    for s in samples:
        arrays = [feats[s]["tokens"], targets[s]["counts"], targets[s]["library_size"], targets[s]["mask"]]
        for arr in arrays:
            k = arr.chunks[0]
            for c in range(arr.cdata_shape[0]):
                block = arr[c * k : (c + 1) * k]
                n += len(block) if arr is arrays[0] else 0
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="uni2h")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--bins", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featcache-bench-stream"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ws = build(args.workdir, args.samples, args.bins, args.encoder)
    ds = ws.open_dataset("stream")
    store = ws.feature_store("stream", args.encoder, random=True)
    inputs = FoldInputs(ds, store)
    every = {s: np.arange(len(inputs.arrays[s].origin)) for s in inputs.samples}
    transform = TargetTransform.fit(load_targets(inputs.arrays[s], every[s]) for s in inputs.samples)
    raw, stream = [], []
    for epoch in range(args.epochs):  # interleaved, so that both see the same page cache
        raw.append(raw_reads(ws, store, inputs.samples))
        t = time.perf_counter()
        n = sum(
            len(b[0])
            for b in Batches(inputs, every, transform, args.batch_size, in_memory=False).epoch(shuffle=True, seed=epoch)
        )
        stream.append(n / (time.perf_counter() - t))
    per_patch = int(np.prod(inputs.arrays[inputs.samples[0]].tokens.shape[1:])) * 2
    emit(
        {
            "benchmark": "streaming",
            "encoder_shape": args.encoder,
            "patches": int(sum(len(v) for v in every.values())),
            "token_mb_per_patch": round(per_patch / 2**20, 2),
            "token_chunk_patches": inputs.arrays[inputs.samples[0]].chunk,
            "batch_size": args.batch_size,
            "raw_tiles_s": round(float(np.median(raw)), 1),
            "stream_tiles_s": round(float(np.median(stream)), 1),
            "epochs": args.epochs,
            "stream_vs_raw": round(float(np.median(np.array(stream) / np.array(raw))), 3),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
