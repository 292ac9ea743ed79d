"""Benchmark a fine-tune step (encoder + decoder, end to end) against a frozen decoder step, in one run.

    python benchmarks/finetune.py [--encoders densenet121,uni2h] [--batch-size 16] [--steps 5]
        [--device auto] [--grad-checkpointing] [--workspace W --dataset D [--epochs 2]] [--out results.jsonl]

Both steps use the same MiniUNet decoder and random inputs of the real shapes (uint8 448 px
patches for fine-tuning, the encoder's cached grid for the frozen step), MSE loss, Adam, bf16
autocast on a GPU. Reports tiles/s and peak memory (GPU: max allocated; CPU: peak RSS growth).

With --workspace and --dataset, also `train finetune` itself (train.run.train_fold, random
initial weights, the first patient's fold, --epochs epochs, batch = micro-batch = --batch-size):
training patches per second of its last epoch (whose time also holds the validation pass), and
that rate as a fraction of the plain step's (goal ≥ 0.9).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.device import resolve_device  # noqa: E402
from featcache.encoders import GridEncoder, build_model, get_spec  # noqa: E402
from train.model import assemble  # noqa: E402


def _peak(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB


def measure(model, make_input, dev, batch, steps, genes=50) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    y = torch.randn(batch, genes, 32, 32, device=dev)
    x = make_input()
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        with torch.autocast(**amp):
            loss = ((model(x).float() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    before = _peak(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    rate = batch * steps / (time.perf_counter() - t)
    return rate, _peak(dev) if dev.type == "cuda" else _peak(dev) - before + 0.0


def through_train_finetune(args, encoder: str, dev, plain_rate: float) -> dict:
    """`train finetune` on a real dataset: training patches per second of the last epoch."""
    import json
    import tempfile

    from featcache.stores import Workspace
    from train.config import TrainConfig
    from train.data import FoldInputs, blocked_split
    from train.run import train_fold

    ws = Workspace.resolve(args.workspace)
    ds = ws.open_dataset(args.dataset)
    fold = sorted(ds.patients)[0]
    cfg = TrainConfig(
        dataset=args.dataset,
        encoder=encoder,
        fold=fold,
        mode="finetune",
        weights="random:0",
        epochs=args.epochs,
        batch_size=args.batch_size,
        micro_batch=args.batch_size,
        grad_checkpointing=args.grad_checkpointing,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "datasets").symlink_to(ws.root / "datasets")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = train_fold(cfg, tmp, device=str(dev), show_progress=False)
        last = json.loads((res.run_dir / "log.jsonl").read_text().splitlines()[-1])
    inputs = FoldInputs(ds, None)
    split, _ = blocked_split({s: inputs.arrays[s].origin for s in inputs.train_samples(fold)}, cfg.val_fraction, 0)
    rate = sum(len(v) for v in split.values()) / last["seconds"]
    return {
        "train_finetune_tiles_s": round(rate, 2),
        "train_finetune_vs_plain_step": round(rate / plain_rate, 3),
        "train_finetune_peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if dev.type == "cuda"
        else None,
        "train_finetune_epochs": args.epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default="densenet121")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--workspace", type=Path, help="a workspace with a prepared dataset: time `train finetune` too")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    b = args.batch_size
    for name in args.encoders.split(","):
        spec = get_spec(name)
        torch.manual_seed(0)
        net = build_model(spec, dev)
        if args.grad_checkpointing:
            net.set_grad_checkpointing(True)
        ft = assemble("unet", spec.dim, 50, GridEncoder(spec, net)).to(dev).train()
        ft_rate, ft_mem = measure(
            ft, lambda: torch.randint(0, 256, (b, 448, 448, 3), dtype=torch.uint8, device=dev), dev, b, args.steps
        )
        del ft, net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        dec = assemble("unet", spec.dim, 50).to(dev).train()
        fr_rate, fr_mem = measure(
            dec,
            lambda spec=spec: torch.randn(b, spec.dim, spec.grid, spec.grid, device=dev),
            dev,
            b,
            max(args.steps, 10),
        )
        row = {
            "benchmark": "finetune",
            "encoder": name,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "batch_size": b,
            "grad_checkpointing": args.grad_checkpointing,
            "finetune_tiles_s": round(ft_rate, 2),
            "frozen_decoder_tiles_s": round(fr_rate, 2),
            "frozen_speedup": round(fr_rate / ft_rate, 1),
            "peak_gib_finetune": round(ft_mem, 2),
            "peak_gib_frozen": round(fr_mem, 2),
            "memory": "GPU max allocated" if dev.type == "cuda" else "CPU RSS growth",
            **(through_train_finetune(args, name, dev, ft_rate) if args.workspace else {}),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        emit(row, args.out)


if __name__ == "__main__":
    main()
