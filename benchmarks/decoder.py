"""Benchmark the decoder stage, in one run:

    python benchmarks/decoder.py --workspace W --dataset demo --encoder densenet121 [--mode random]
        [--batch-size 16] [--steps 10] [--device auto] [--loocv-epochs 0] [--out results.jsonl]

1. decoder training throughput on a batch already on the device (tiles/s of MiniUNet steps) vs
   recomputing the frozen encoder every step (the fine-tune-style cost), and their ratio;
2. with --loocv-epochs N: the wall time of a full leave-one-patient-out run (every fold, N epochs,
   the same batch size) through `train.loocv.run_loocv` (on a GPU with N=200 and ~220 patches per
   patient this is the "≤ 2 minutes" target), and the rate its epochs reach: training patches per
   second of an epoch (whose seconds also hold the validation pass), as a fraction of (1) — a
   lower bound of the loop's efficiency against steps on tensors already on the device.

The streaming loader has its own benchmark (benchmarks/streaming.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.device import resolve_device  # noqa: E402
from featcache.encoders import GridEncoder, build_model, get_spec  # noqa: E402
from featcache.stores import Workspace  # noqa: E402
from train.data import Batches, FoldInputs, TargetTransform, blocked_split, load_targets  # noqa: E402
from train.decoder import MiniUNet  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--encoder", default="densenet121")
    ap.add_argument("--mode", default="random")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--loocv-epochs", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    ws = Workspace.resolve(args.workspace)
    inputs = FoldInputs(
        ws.open_dataset(args.dataset), ws.feature_store(args.dataset, args.encoder, args.mode == "random")
    )
    samples = inputs.samples
    train = {s: np.arange(len(inputs.arrays[s].origin)) for s in samples}
    transform = TargetTransform.fit(load_targets(inputs.arrays[s], train[s]) for s in samples)
    b = args.batch_size
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    # 1. decoder steps from cached grids vs encoder recomputed each step
    batches = Batches(inputs, train, transform, b, in_memory=True)
    tok, y, m, _ = next(batches.epoch(shuffle=True))
    x = torch.from_numpy(tok).to(dev).float()
    yt, mt = torch.from_numpy(y).to(dev), torch.from_numpy(m).to(dev).unsqueeze(1).float()
    torch.manual_seed(0)
    dec = MiniUNet(inputs.channels, len(inputs.genes)).to(dev)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-4)

    def step(feats):
        with torch.autocast(**amp):
            loss = ((dec(feats).float() - yt) ** 2 * mt).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step(x)
    sync(dev)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(x)
    sync(dev)
    cached = b * args.steps / (time.perf_counter() - t)

    spec = get_spec(args.encoder)
    enc = GridEncoder(spec, build_model(spec, dev)).to(dev).eval()
    img = torch.from_numpy(np.asarray(ws.open_dataset(args.dataset).image_array(samples[0])[:b])).to(dev)
    if len(img) < b:
        img = img.repeat((b + len(img) - 1) // len(img), 1, 1, 1)[:b]
    steps_enc = max(2, args.steps // 4)

    def enc_step():
        with torch.no_grad(), torch.autocast(**amp):
            feats, _ = enc(img)
        step(feats.permute(0, 3, 1, 2).float())

    enc_step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps_enc):
        enc_step()
    sync(dev)
    recompute = b * steps_enc / (time.perf_counter() - t)

    row = {
        "benchmark": "decoder",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "encoder": args.encoder,
        "mode": args.mode,
        "batch_size": b,
        "channels": inputs.channels,
        "decoder_from_cache_tiles_s": round(cached, 2),
        "encoder_recomputed_tiles_s": round(recompute, 2),
        "cache_speedup": round(cached / recompute, 1),
        "patches_per_sample": {s: len(train[s]) for s in samples},
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if args.loocv_epochs:
        from train.loocv import run_loocv

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            import shutil

            for sub in ("datasets", "features"):
                os.symlink(ws.root / sub, Path(tmp) / sub)
            run_loocv(
                args.dataset,
                [args.encoder],
                [args.mode],
                {"epochs": args.loocv_epochs, "batch_size": b},
                workspace=tmp,
                device=str(dev),
                show_progress=False,
            )
            row["loocv_wall_s"] = round(time.perf_counter() - t, 1)
            rates = []
            for log in sorted((Path(tmp) / "runs").rglob("log.jsonl")):
                cfg = json.loads((log.parent / "config.json").read_text())
                seconds = np.median([json.loads(line)["seconds"] for line in log.read_text().splitlines()[1:]])
                split, _ = blocked_split(
                    {s: inputs.arrays[s].origin for s in cfg["train_samples"]}, cfg["val_fraction"], cfg["seed"]
                )
                rates.append(sum(len(v) for v in split.values()) / seconds)
            row["loocv_epoch_tiles_s"] = round(float(np.median(rates)), 1)
            row["loocv_epoch_vs_on_device_steps"] = round(float(np.median(rates)) / cached, 3)
            row["loocv_epochs"] = args.loocv_epochs
            row["loocv_folds"] = len(samples)
            shutil.rmtree(Path(tmp) / "runs", ignore_errors=True)
    emit(row, args.out)


if __name__ == "__main__":
    main()
