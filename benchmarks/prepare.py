"""Benchmark `featcache prepare` on a large synthetic BigTIFF: throughput and peak memory.

    python benchmarks/prepare.py [--bins 700] [--workdir /tmp/featcache-bench] [--workers 2]

Synthesizes one sample whose full-resolution image is about (bins × 29.2 + margin) px square
(700 bins ≈ 20.5k × 20.5k px, 1.26 GB of raw RGB), then runs `featcache prepare` on it in a
child process and reports patches/s and the child's peak resident memory next to the image's raw
size. The synthetic input is cached in --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tifffile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bins", type=int, default=700, help="bins per side of the synthetic grid")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featcache-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    args = ap.parse_args()

    raw = args.workdir / f"raw-{args.bins}"
    if not (raw / "B1" / "outs").is_dir():
        shutil.rmtree(raw, ignore_errors=True)
        t = time.perf_counter()
        from featcache.synth import SynthConfig, synthesize

        synthesize(raw, ["B1"], SynthConfig(rows=args.bins, cols=args.bins, n_genes=80, seed=0))
        print(f"synthesized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    image = raw / "B1" / "B1_tissue_image.btf"
    with tifffile.TiffFile(image) as tf:
        shape = tf.series[0].shape
    ws = args.workdir / "ws"
    shutil.rmtree(ws, ignore_errors=True)

    cmd = [sys.executable, "-m", "featcache", "prepare", "--dataset", "bench", "--sample", f"B1={raw / 'B1'}",
           "--workspace", str(ws), "--workers", str(args.workers)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    meta = json.loads((ws / "datasets" / "bench" / "dataset.json").read_text())
    n = meta["samples"]["B1"]["n_patches"]
    result = {
        "benchmark": "prepare",
        "image_px": list(shape[:2]),
        "image_raw_mb": round(shape[0] * shape[1] * 3 / 2**20),
        "patches": n,
        "wall_s": round(wall, 1),
        "patches_per_s": round(n / wall, 2),
        "peak_rss_mb": round(peak_mb),
        "workers": args.workers,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}",
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
