"""Benchmark `featcache prepare` at a real Visium HD sample's size: throughput and peak memory.

    python benchmarks/prepare.py [--bins 742] [--genes 18085] [--compression jpeg] [--workers 2]
        [--workdir /tmp/featcache-bench] [--out benchmarks/results/prepare-cpu.jsonl]

Synthesizes one sample of bins × bins 8 µm bins (742² ≈ 550,000, a real slide's count) with a
panel of --genes genes (18,085: a human HD panel; counts drawn sparsely, ~300 UMIs per bin) and a
tiled pyramidal BigTIFF of about (bins × 29.2 + margin) px square with --compression tiles, then
runs `featcache prepare` on it in a fresh interpreter and reports patches/s, the child's peak
resident memory and the memory before rendering started. The synthetic input is cached in
--workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

CHILD = """
import json, sys
from featcache import prepare as P

def rss_mb():  # this process's own peak (VmHWM: ru_maxrss would keep the forking parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

marks = {}
original = P.render_patch
def hooked(*a, **k):  # note the peak so far when rendering starts
    marks.setdefault("before", rss_mb())
    return original(*a, **k)
P.render_patch = hooked
P.prepare_dataset("bench", {"B1": sys.argv[1]}, workspace=sys.argv[2], workers=int(sys.argv[3]), show_progress=False)
print(json.dumps({"peak_rss_mb": round(rss_mb()), "rss_before_rendering_mb": round(marks["before"])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bins", type=int, default=742, help="bins per side of the synthetic grid")
    ap.add_argument("--genes", type=int, default=18085)
    ap.add_argument("--compression", default="jpeg", help="tile compression of the BigTIFF (jpeg, zlib, ...)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featcache-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    args = ap.parse_args()

    raw = args.workdir / f"raw-{args.bins}-{args.genes}-{args.compression}"
    if not (raw / "B1" / "outs").is_dir():
        shutil.rmtree(raw, ignore_errors=True)
        t = time.perf_counter()
        from featcache.synth import SynthConfig, synthesize

        synthesize(
            raw,
            ["B1"],
            SynthConfig(rows=args.bins, cols=args.bins, n_genes=args.genes, seed=0, compression=args.compression),
        )
        print(f"synthesized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    image = raw / "B1" / "B1_tissue_image.btf"
    with tifffile.TiffFile(image) as tf:
        shape = tf.series[0].shape
        compression = tf.pages[0].compression.name
    with h5py.File(raw / "B1" / "outs" / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5") as f:
        n_features, n_bins_in_tissue = (int(v) for v in f["matrix/shape"][()])
        nnz = int(f["matrix/data"].shape[0])
    ws = args.workdir / "ws"
    shutil.rmtree(ws, ignore_errors=True)

    # A fresh interpreter runs prepare and reports its own peak RSS, read from /proc (ru_maxrss survives exec and
    # would report this parent's peak, e.g. while synthesizing the input).
    t = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(raw / "B1"), str(ws), str(args.workers)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    meta = json.loads((ws / "datasets" / "bench" / "dataset.json").read_text())
    n = meta["samples"]["B1"]["n_patches"]
    emit(
        {
            "benchmark": "prepare",
            "image_px": list(shape[:2]),
            "image_raw_mb": round(shape[0] * shape[1] * 3 / 2**20),
            "image_compression": compression,
            "bins": args.bins**2,
            "in_tissue_bins": n_bins_in_tissue,
            "features": n_features,
            "nonzeros": nnz,
            "patches": n,
            "wall_s": round(wall, 1),
            "patches_per_s": round(n / wall, 2),
            "peak_rss_mb": measured["peak_rss_mb"],
            "rss_before_rendering_mb": measured["rss_before_rendering_mb"],
            "rss_growth_while_rendering_mb": measured["peak_rss_mb"] - measured["rss_before_rendering_mb"],
            "workers": args.workers,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
