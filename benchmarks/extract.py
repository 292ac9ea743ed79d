"""Benchmark feature extraction: model-forward-only vs end-to-end `featcache extract`, in one run.

    python benchmarks/extract.py --source-workspace W --source-dataset demo \
        [--encoders densenet121,uni2h] [--patches 2048] [--batch-size 64] [--device auto] [--out results.jsonl]

For each encoder (random weights: the speed of a network does not depend on its weight values):

* model only: uint8 patches already on the device, normalisation + forward + grid reshape, bf16
  autocast on a GPU (fp32 on a CPU), timed after warm-up;
* with --stub, each encoder is replaced by a stand-in of the same output shape that costs almost
  nothing (StubEncoder): end to end is then the host side's ceiling (reading, copying, checking,
  compressing, writing), and a profile of it (py-spy) shows where the host's time goes;
* end to end: `featcache.extract.extract` over a dataset of --patches patches (the source dataset's
  patches repeated, each chunk compressed separately so decoding is real work), reading, copying,
  computing, checking, compressing and writing the store;
* peak device memory, bytes on disk per stored value, and the stored-layout alternatives: the
  first stored chunks re-encoded channel-last vs channel-first, with and without a byte shuffle,
  at zstd levels 1 and 3 (size, encode and decode speed).

Writes one JSON line per encoder (to stdout, and appended to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.device import resolve_device  # noqa: E402
from featcache.encoders import GridEncoder, build_model, get_spec  # noqa: E402
from featcache.extract import ExtractionConfig, extract  # noqa: E402
from featcache.stores.zarrio import DEFAULT_TOKEN_CODEC, create_array, write_origins  # noqa: E402


def replicate_dataset(src_ws: Path, src_dataset: str, dst_ws: Path, n: int) -> str:
    """A dataset 'bench' with one sample of n patches cycled from the source dataset's patches."""
    name = f"bench{n}"
    dst = dst_ws / "datasets" / name
    if (dst / "dataset.json").is_file():
        return name
    src_meta = json.loads((src_ws / "datasets" / src_dataset / "dataset.json").read_text())
    src = zarr.open_group(zarr.storage.LocalStore(src_ws / "datasets" / src_dataset / "patches.zarr"), mode="r")
    pool = np.concatenate([src[s]["image"][:] for s in src_meta["samples"]])
    dst.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(zarr.storage.LocalStore(dst / "patches.zarr"), mode="w")
    g = root.create_group("B")
    img = create_array(
        g, "image", shape=(n, 448, 448, 3), chunks=(8, 448, 448, 3), dtype="uint8", dims=("patch", "y", "x", "rgb")
    )
    for k in range(0, n, 256):
        idx = np.arange(k, min(k + 256, n)) % len(pool)
        img[k : k + len(idx)] = pool[idx]
    write_origins(g, np.stack([np.arange(n) // 64 * 32, np.arange(n) % 64 * 32], 1))
    meta = {
        "format": "featcache.dataset/1",
        "dataset": name,
        "fingerprint": f"bench:{src_meta['fingerprint']}:{n}",
        "geometry": src_meta["geometry"],
        "genes": src_meta["genes"],
        "samples": {"B": {"n_patches": n}},
    }
    (dst / "dataset.json").write_text(json.dumps(meta))
    return name


class StubEncoder(torch.nn.Module):
    """Stands in for an encoder to measure the host's share of extraction: the spec's output shape
    (prefix tokens + grid × dim for a ViT, dim × grid × grid for a CNN) from an average pool and a
    fixed projection, plus a fixed random pattern so that the float16 tokens compress as badly as a
    real ViT's. Costs a few per cent of the real model's compute."""

    def __init__(self, spec, prefix_tokens: int):
        super().__init__()
        self.kind, self.grid, self.num_prefix_tokens = spec.kind, spec.grid, prefix_tokens
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3, spec.dim, generator=g))
        self.register_buffer("pattern", torch.randn(spec.grid * spec.grid, spec.dim, generator=g))
        if spec.pre_activation:  # GridEncoder drops this layer's activation
            parent = self
            for part in spec.pre_activation.split("."):
                parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.act = torch.nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (B, g², 3)
        tokens = small @ self.proj + self.pattern
        if self.kind == "cnn":
            return tokens.transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)
        prefix = tokens[:, : self.num_prefix_tokens].mean(dim=1, keepdim=True).expand(-1, self.num_prefix_tokens, -1)
        return torch.cat([prefix, tokens], dim=1)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def model_only(enc, dev, precision, batch, iters):
    x = torch.randint(0, 256, (batch, 448, 448, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(3):
            enc(x)
        sync(dev)
        t = time.perf_counter()
        for _ in range(iters):
            tok, pooled = enc(x)
            tok.half()
        sync(dev)
    return batch * iters / (time.perf_counter() - t)


def layout_study(tokens: np.ndarray, chunk: int, stored_layout: str) -> list[dict]:
    """Write stored token chunks again in each physical layout with each codec; size and speed."""
    from featcache.stores.zarrio import TOKEN_CODECS

    channel_first = tokens if stored_layout == "channel-first" else tokens.transpose(0, 3, 1, 2)
    variants = {
        "channel-first": np.ascontiguousarray(channel_first),
        "channel-last": np.ascontiguousarray(channel_first.transpose(0, 2, 3, 1)),
    }
    rows = []
    for layout, data in variants.items():
        for name, (filters, compressors) in TOKEN_CODECS.items():
            store = zarr.storage.MemoryStore()
            arr = zarr.create_array(
                store,
                shape=data.shape,
                chunks=(chunk, *data.shape[1:]),
                dtype="float16",
                filters=filters,
                compressors=compressors,
                config={"write_empty_chunks": True},
            )
            t = time.perf_counter()
            arr[:] = data
            enc_s = time.perf_counter() - t
            t = time.perf_counter()
            back = arr[:]
            dec_s = time.perf_counter() - t
            assert np.array_equal(back.view(np.uint16), data.view(np.uint16))
            size = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
            rows.append(
                {
                    "layout": layout,
                    "codec": name,
                    "bytes_per_value": round(size / data.size, 4),
                    "write_mb_s": round(data.nbytes / enc_s / 1e6),
                    "read_mb_s": round(data.nbytes / dec_s / 1e6),
                }
            )
    return rows


def read_only(ws: Path, dataset: str, n: int, threads: int, pin: bool) -> float:
    """Patch decoding alone: the reader side of the pipeline, no model."""
    from concurrent.futures import ThreadPoolExecutor

    img = zarr.open_group(zarr.storage.LocalStore(ws / "datasets" / dataset / "patches.zarr"), mode="r")["B"]["image"]

    def read(k):
        t = torch.from_numpy(np.ascontiguousarray(img[k : k + 64]))
        return t.pin_memory() if pin else t

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(read, range(0, n, 64)):
            pass
    return n / (time.perf_counter() - t)


def write_only(folder: Path, n: int, threads: int, skip_empty_check: bool, codec: str) -> float:
    """The writer side alone: UNI2-h-sized float16 token chunks (3 × 1536 × 32 × 32, as bad to compress
    as a ViT's) written chunk by chunk from ``threads`` threads into an array opened the way the
    extractor opens it, with zarr's per-chunk "all fill value?" check on or off."""
    from concurrent.futures import ThreadPoolExecutor

    from featcache.stores.zarrio import create_array

    path = folder / "writeprobe.zarr"
    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
    create_array(
        root,
        "tokens",
        shape=(n, 1536, 32, 32),
        chunks=(3, 1536, 32, 32),
        dtype="float16",
        dims=("patch", "channel", "row", "col"),
        fill_value=float("nan"),
        codec=codec,
    )
    arr = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")["tokens"]
    if skip_empty_check:
        arr = arr.with_config({"write_empty_chunks": True})
    block = np.random.default_rng(0).normal(size=(3, 1536, 32, 32)).astype(np.float16)

    def write(a):
        arr[a : min(a + 3, n)] = block[: min(3, n - a)]

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(0, n, 3)))
    rate = n / (time.perf_counter() - t)
    shutil.rmtree(path, ignore_errors=True)
    return rate


def disk_write_mb_s(folder: Path, mb: int = 1024) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = folder / "ddprobe.bin"
    t = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(mb // 64):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return mb / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source-workspace", type=Path, required=True)
    ap.add_argument("--source-dataset", default="demo")
    ap.add_argument("--encoders", default="densenet121,uni2h")
    ap.add_argument("--patches", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--stub", action="store_true", help="replace each encoder by StubEncoder: the host's share")
    ap.add_argument("--prefix-tokens", type=int, default=9, help="prefix tokens of the stub (UNI2-h: cls + 8)")
    ap.add_argument("--codec", default=None, help="token codec preset [default: featcache's]")
    ap.add_argument("--layout", default="channel-first", choices=["channel-first", "channel-last"])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-extract")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--store-dir", type=Path, help="where the feature stores go [default: WORKDIR/features]")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    precision = "bf16" if dev.type == "cuda" else "fp32"
    ws = args.workdir
    dataset = replicate_dataset(args.source_workspace, args.source_dataset, ws, args.patches)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    store_dir = args.store_dir or ws / "features"
    io = {
        "benchmark": "extract-io",
        "device": card,
        "disk_write_mb_s": round(disk_write_mb_s(store_dir), 1),
        "patch_read_tiles_s": round(read_only(ws, dataset, args.patches, 4, dev.type == "cuda"), 1),
        "patch_read_tiles_s_8_threads": round(read_only(ws, dataset, args.patches, 8, dev.type == "cuda"), 1),
        **{
            f"uni2h_write_tiles_s_{k}_threads_empty_check_{'off' if off else 'on'}": round(
                write_only(store_dir, min(args.patches, 384), k, off, args.codec or DEFAULT_TOKEN_CODEC), 1
            )
            for k in (2, 8)
            for off in (False, True)
        },
        "store_dir": str(store_dir),
    }
    emit(io, args.out)
    for name in args.encoders.split(","):
        spec = get_spec(name)
        torch.manual_seed(0)
        t = time.perf_counter()
        model = StubEncoder(spec, args.prefix_tokens).to(dev) if args.stub else build_model(spec, dev)
        build_s = time.perf_counter() - t
        enc = GridEncoder(spec, model).to(dev).eval()
        runner = torch.compile(enc) if args.compile else enc
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        mo = model_only(runner, dev, precision, args.batch_size, args.iters)
        peak_model = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        store = store_dir / f"{name}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        t = time.perf_counter()
        config = ExtractionConfig(
            name, weights="random:0", layout=args.layout, **({"codec": args.codec} if args.codec else {})
        )
        res = extract(
            dataset,
            config,
            workspace=ws,
            output=str(store),
            batch_size=args.batch_size,
            device=str(dev),
            compile=args.compile,
            show_progress=False,
            model=model,
        )
        wall = time.perf_counter() - t
        peak_e2e = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        tokens = zarr.open_group(zarr.storage.LocalStore(store), mode="r")["B"]["tokens"]
        stored = sum(f.stat().st_size for f in (store / "B" / "tokens").rglob("*") if f.is_file())
        sample = np.asarray(tokens[: min(tokens.shape[0], max(8, 4 * tokens.chunks[0]))])
        row = {
            "benchmark": "extract",
            "encoder": name,
            "device": card,
            "precision": precision,
            "compile": args.compile,
            "stub_model": args.stub,
            "batch_size": args.batch_size,
            "patches": args.patches,
            "model_only_tiles_s": round(mo, 1),
            "end_to_end_tiles_s": round(res.tiles_per_s, 1),
            "ratio": round(res.tiles_per_s / mo, 3),
            "end_to_end_wall_s": round(wall, 1),
            "build_s": round(build_s, 1),
            "peak_gpu_gib_model_only": round(peak_model, 2) if peak_model else None,
            "peak_gpu_gib_end_to_end": round(peak_e2e, 2) if peak_e2e else None,
            "stored_bytes_per_value": round(stored / tokens.size, 4),
            "chunk_patches": tokens.chunks[0],
            "codec": args.codec or DEFAULT_TOKEN_CODEC,
            "layout": args.layout,
            "codecs": layout_study(sample, tokens.chunks[0], args.layout),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        shutil.rmtree(store, ignore_errors=True)  # keep the disk (or RAM) free for the next encoder
        emit(row, args.out)
        del model, enc, runner
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
