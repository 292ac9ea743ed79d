"""Every registered encoder at full size: parameters, one forward's time, and (on a GPU) tiles/s and memory.

    python benchmarks/encoders.py [--encoders a,b] [--device cpu|cuda] [--batch-size 1] [--iters 2] [--out F]

For each encoder of the registry (test-only stand-ins left out unless named), at its own input size
(32 bins × its pixels per bin: 448 px for patch-14 models, 512 px for patch-16 and stride-16 ones):

* parameters without a head, counted on the meta device (no memory for the weights);
* the network built with random weights (the speed of a network does not depend on its weight values;
  weights are filled from a normal distribution rather than by timm's initialisers, which take
  minutes for a ViT-g on a CPU), the model forward of ``GridEncoder`` (normalisation, forward, grid
  and pooled output) on random uint8 pixels, timed after one warm-up: seconds per patch on a CPU
  (fp32, batch 1), tiles/s and peak memory on a GPU (bf16 autocast);
* the grid and widths it returned, checked against the registry entry.

Writes one JSON line per encoder (stdout, and appended to --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.encoders import REGISTRY, GridEncoder, build_model, get_spec  # noqa: E402


def count_params(spec) -> int:
    return sum(p.numel() for p in build_model(spec, device="meta").parameters())


def random_model(spec, dev: torch.device) -> torch.nn.Module:
    model = build_model(spec, device="meta").to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif b.is_floating_point():
                b.zero_()
    return model.eval()


def measure(spec, dev: torch.device, batch: int, iters: int) -> dict:
    enc = GridEncoder(spec, random_model(spec, dev)).to(dev)
    x = torch.randint(0, 256, (batch, spec.input_px, spec.input_px, 3), dtype=torch.uint8, device=dev)
    gpu = dev.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
        tokens, pooled = enc(x)  # warm-up
        if gpu:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(iters):
            tokens, pooled = enc(x)
        if gpu:
            torch.cuda.synchronize(dev)
        seconds = (time.perf_counter() - t) / iters
    grid = list(tokens.shape[1:3])
    assert grid == [spec.grid, spec.grid] and tokens.shape[3] == spec.dim and pooled.shape[1] == spec.pooled_dim, (
        spec.name,
        tuple(tokens.shape),
        tuple(pooled.shape),
    )
    row = {
        "input_px": spec.input_px,
        "grid": grid,
        "batch": batch,
        "s_per_batch": round(seconds, 4),
        "tiles_per_s": round(batch / seconds, 2),
    }
    if gpu:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    del enc
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", help="comma-separated names (default: every encoder that is not test-only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1 on a CPU, 64 on a GPU")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards after the warm-up (default 2 CPU, 10 GPU)")
    ap.add_argument("--no-forward", action="store_true", help="parameter counts only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    batch = args.batch_size or (64 if dev.type == "cuda" else 1)
    iters = args.iters or (10 if dev.type == "cuda" else 2)
    names = args.encoders.split(",") if args.encoders else [n for n, s in REGISTRY.items() if not s.test_only]
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    for name in names:
        spec = get_spec(name)
        row = {
            "bench": "encoders",
            "encoder": name,
            "device": machine,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "px_per_bin": spec.px_per_bin,
            "dim": spec.dim,
            "pooled_dim": spec.pooled_dim,
            "params": count_params(spec),
        }
        if not args.no_forward:
            row.update(measure(spec, dev, batch, iters))
        emit(row, args.out)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
