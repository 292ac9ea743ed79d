"""Benchmark `featcache predict` on large synthetic slides: tiles/s beside `extract`'s on the same
patches in the same run, and peak memory at two slide sizes.

    python benchmarks/predict.py [--bins 371,742] [--genes 1000] [--encoder tiny-cnn] [--batch-size 16]
        [--device auto] [--workers N] [--workdir /tmp/featcache-bench] [--out benchmarks/results/predict-cpu.jsonl]

Once (cached in --workdir): a run to apply (--encoder with random weights, the decoder trained for
one epoch on three small synthetic sections: speed does not depend on what was learned), and one
synthetic sample per size of --bins × --bins bins with a JPEG-tiled pyramidal BigTIFF (the same
inputs as benchmarks/prepare.py). Then, per size, each in a fresh interpreter that reports its own
peak resident memory (VmHWM):

* prepare + extract: the sample prepared as a dataset, then `featcache extract` of its patches;
* predict --positions: the run applied on the sample's own lattice (the same patches), rendering
  them from the slide as it goes;
* predict (virtual lattice): the run applied to the slide alone, tissue found on a thumbnail.

Reports tiles/s of each, predict/extract (goal ≥ 0.9) and peak RSS per size (goal: flat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit  # noqa: E402

CHILD = """
import json, sys, time
args = json.loads(sys.argv[1])

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)

if args["task"] == "extract":
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    import shutil
    prepare_dataset(args["dataset"], {"B1": args["sample"]}, workspace=args["ws"], show_progress=False, overwrite=True)
    shutil.rmtree(f"{args['ws']}/features/{args['dataset']}/{args['encoder']}-random.zarr", ignore_errors=True)
    before = rss_mb()
    res = extract(args["dataset"], ExtractionConfig(args["encoder"], "random:0"), workspace=args["ws"],
                  device=args["device"], batch_size=args["batch_size"], show_progress=False, overwrite=True)
    print(json.dumps({"tiles_s": res.tiles_per_s, "patches": res.patches_done, "peak_rss_mb": rss_mb(),
                      "rss_before_mb": before}))
else:
    from pipeline.predict import PredictOptions, predict
    res = predict(args["run"], args["image"], PredictOptions(positions=args.get("positions")), output=args["output"],
                  batch_size=args["batch_size"], device=args["device"], workspace=args["ws"], workers=args["workers"],
                  overwrite=True, show_progress=False)
    print(json.dumps({"tiles_s": res.tiles_per_s, "patches": res.patches, "bins": res.bins,
                      "peak_rss_mb": rss_mb()}))
"""


def child(**task) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(task)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def trained_run(workdir: Path, encoder: str, device: str) -> Path:
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    from featcache.stores import Workspace
    from featcache.synth import SynthConfig, synthesize
    from train.config import TrainConfig
    from train.run import train_fold

    ws = Workspace.resolve(workdir / "predict-ws")
    cfg = TrainConfig(dataset="small", encoder=encoder, fold="P5", mode="random", epochs=1, val_fraction=0.0)
    run = ws.run(cfg.dataset, cfg.encoder, cfg.run_name, cfg.fold)
    if (run.path / "metrics.json").is_file():
        return run.path
    raw = workdir / "predict-raw"
    names = ["P1", "P2", "P5"]
    if not all((raw / n / "outs").is_dir() for n in names):
        synthesize(raw, names, SynthConfig(seed=3))
    if not ws.dataset("small").exists():
        prepare_dataset("small", {n: str(raw / n) for n in names}, workspace=ws.root, show_progress=False)
    extract("small", ExtractionConfig(encoder, "random:0"), workspace=ws.root, device=device, show_progress=False)
    return train_fold(cfg, ws.root, device=device, show_progress=False).run_dir


def slide(workdir: Path, bins: int, genes: int) -> Path:
    from featcache.synth import SynthConfig, synthesize

    raw = workdir / f"raw-{bins}-{genes}-jpeg"  # shared with benchmarks/prepare.py
    if not (raw / "B1" / "outs").is_dir():
        synthesize(raw, ["B1"], SynthConfig(rows=bins, cols=bins, n_genes=genes, seed=0, compression="jpeg"))
    return raw / "B1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bins", default="371,742", help="comma-separated slide sizes (bins per side)")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--encoder", default="tiny-cnn")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, help="rendering threads of predict [default: predict's own default]")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featcache-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from featcache.device import resolve_device

    device = str(resolve_device(args.device))
    import torch

    from pipeline.predict import render_workers

    args.workers = args.workers or render_workers(torch.device(device))
    run = trained_run(args.workdir, args.encoder, device)
    ws = str(args.workdir / "predict-ws")
    common = {"ws": ws, "device": device, "batch_size": args.batch_size, "encoder": args.encoder}
    for bins in (int(b) for b in args.bins.split(",")):
        sample = slide(args.workdir, bins, args.genes)
        image = next(p for p in sample.iterdir() if p.name.endswith(".btf"))
        t = time.perf_counter()
        ext = child(task="extract", dataset=f"large{bins}", sample=str(sample), **common)
        pos = child(
            task="predict",
            run=str(run),
            image=str(image),
            positions=str(sample / "outs"),
            output=str(args.workdir / f"pred-pos-{bins}"),
            workers=args.workers,
            **common,
        )
        virt = child(
            task="predict",
            run=str(run),
            image=str(image),
            output=str(args.workdir / f"pred-virtual-{bins}"),
            workers=args.workers,
            **common,
        )
        emit(
            {
                "benchmark": "predict",
                "encoder": args.encoder,
                "device": device,
                "slide_bins": bins**2,
                "extract_patches": ext["patches"],
                "extract_tiles_s": round(ext["tiles_s"], 2),
                "predict_positions_patches": pos["patches"],
                "predict_positions_tiles_s": round(pos["tiles_s"], 2),
                "predict_vs_extract": round(pos["tiles_s"] / ext["tiles_s"], 3),
                "predict_virtual_patches": virt["patches"],
                "predict_virtual_bins": virt["bins"],
                "predict_virtual_tiles_s": round(virt["tiles_s"], 2),
                "peak_rss_mb_predict_positions": pos["peak_rss_mb"],
                "peak_rss_mb_predict_virtual": virt["peak_rss_mb"],
                "peak_rss_mb_prepare_extract": ext["peak_rss_mb"],
                "batch_size": args.batch_size,
                "predict_workers": args.workers,
                "wall_s": round(time.perf_counter() - t, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            },
            args.out,
        )


if __name__ == "__main__":
    main()
