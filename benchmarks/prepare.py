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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

CHILD = """
import json, resource, sys, threading, time
from featcache import prepare as P

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

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

    # A fresh interpreter runs prepare and reports its own peak RSS (RUSAGE_CHILDREN would count
    # the parent's pages at fork time, and every earlier child).
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
    result = {
        "benchmark": "prepare",
        "image_px": list(shape[:2]),
        "image_raw_mb": round(shape[0] * shape[1] * 3 / 2**20),
        "patches": n,
        "wall_s": round(wall, 1),
        "patches_per_s": round(n / wall, 2),
        "peak_rss_mb": measured["peak_rss_mb"],
        "rss_before_rendering_mb": measured["rss_before_rendering_mb"],
        "rss_growth_while_rendering_mb": measured["peak_rss_mb"] - measured["rss_before_rendering_mb"],
        "bins": args.bins**2,
        "workers": args.workers,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
