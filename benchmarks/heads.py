"""The heads side by side on the demo dataset: ridge (HEST-Benchmark's protocol, α by inner folds and HEST's fixed
α) against the linear and UNet decoders, every metric at 8, 16, 32 µm and per patch:

    python benchmarks/heads.py --workspace W [--encoder tiny-cnn] [--epochs 15] [--device cpu]
        [--heads unet,poisson,nb,...] [--out benchmarks/results/heads.jsonl]
        [--figure docs/demo_heads_pcc_vs_bin_size.png]

The demo's data (three synthetic patients P1, P2, P5, seed 0) and the demo's frozen encoder (featcache's shipped
tiny-cnn weights) are made in W when missing; every head is trained leave-one-patient-out from the same feature
store (the linear and UNet heads with the demo's settings: batch 8, lr 1e-3, ``--epochs``); one JSON row per head
(mean ± std over folds, seconds), and the PCC-vs-bin-size figure of the runs. The UNet also trains with the count
losses (``--loss poisson`` and ``nb``), scored in the same target space as MSE.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.stores import Workspace  # noqa: E402

HEADS = {  # label -> TrainConfig options
    "ridge (α by inner LOPO)": {"decoder": "ridge"},
    "ridge (HEST's fixed α)": {"decoder": "ridge", "alpha": "hest"},
    "linear": {"decoder": "linear"},
    "unet": {"decoder": "unet"},
    "unet, Poisson loss": {"decoder": "unet", "loss": "poisson"},
    "unet, NB loss": {"decoder": "unet", "loss": "nb"},
}
METRICS = ("pcc_gene", "pcc_gene_16um", "pcc_gene_32um", "pcc_gene_patch", "pearson_r", "mse")


def prepare_demo(ws: Workspace, encoder: str, device: str) -> None:
    """The demo's dataset and frozen feature store, made once."""
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    from featcache.pretrain import shipped_weights
    from featcache.synth import SynthConfig, synthesize
    from pipeline import DEMO_SAMPLES

    raw = ws.raw_dir("demo-seed0")
    missing = [n for n in DEMO_SAMPLES if not (raw / n / "outs").is_dir()]
    if missing:
        synthesize(raw, missing, SynthConfig(seed=0))
    if not ws.dataset("demo").exists():
        prepare_dataset("demo", {n: str(raw / n) for n in DEMO_SAMPLES}, workspace=ws.root, show_progress=False)
    if not ws.feature_store("demo", encoder).exists():
        weights = shipped_weights(encoder)
        if weights is None:
            raise SystemExit(f"no shipped weights for {encoder}; use the demo's encoder, tiny-cnn")
        extract("demo", ExtractionConfig(encoder, str(weights)), workspace=ws.root, device=device, show_progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--encoder", default="tiny-cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads", help="comma-separated: ridge, ridge-hestalpha, linear, unet, poisson, nb (default all)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args()
    chosen = HEADS
    if args.heads:
        by_run = {_run_name(h).removeprefix("frozen").lstrip("-") or "unet": label for label, h in HEADS.items()}
        unknown = [h for h in args.heads.split(",") if h not in by_run]
        if unknown:
            raise SystemExit(f"--heads {','.join(unknown)}: choose from {', '.join(sorted(by_run))}")
        chosen = {by_run[h]: HEADS[by_run[h]] for h in args.heads.split(",")}
    from analysis.figures import _style, bin_size_figure
    from featcache.provenance import library_versions
    from pipeline import loocv
    from train.summary import summarize

    ws = Workspace.resolve(args.workspace)
    t0 = time.perf_counter()
    prepare_demo(ws, args.encoder, args.device)
    print(f"demo data and {args.encoder} features ready in {time.perf_counter() - t0:.1f} s", flush=True)
    seconds, keys = {}, {}
    for label, head in chosen.items():
        options = dict(head)
        if head["decoder"] != "ridge":
            options.update(epochs=args.epochs, batch_size=8, lr=1e-3)
        t = time.perf_counter()
        res = loocv(
            "demo", [args.encoder], ["frozen"], options, workspace=ws.root, device=args.device, show_progress=False
        )
        seconds[label] = round(time.perf_counter() - t, 1)
        keys[label] = next(k for k, r in res["results"].items() if r["run"] == _run_name(head))
        print(f"{label}: {seconds[label]} s ({keys[label]})", flush=True)
    runs = summarize("demo", ws.root)["results"]
    for label, key in keys.items():
        r = runs[key]
        row = {
            "benchmark": "heads",
            "head": label,
            "run": key,
            "encoder": args.encoder,
            "epochs": args.epochs if HEADS[label]["decoder"] != "ridge" else None,
            "loocv_seconds": seconds[label],  # this invocation's (finished folds are reused)
            "fold_seconds": _fold_seconds(ws, r),
            "device": args.device,
            "alpha_per_fold": {f: e["per_seed"][0].get("ridge_alpha") for f, e in r["fold_results"].items()},
            **{m: {"mean": r[m]["mean"], "std": r[m]["std"]} for m in METRICS},
            "libraries": library_versions(),
        }
        emit(row, args.out)
    if args.figure:
        with tempfile.TemporaryDirectory(prefix="heads-fig-") as tmp, _style():
            bin_size_figure({label: {**runs[k], "mode": "frozen"} for label, k in keys.items()}, Path(tmp))
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "pcc_vs_bin_size.png", args.figure)
        print(f"figure: {args.figure}")


def _fold_seconds(ws: Workspace, run: dict) -> dict:
    """Per fold, the seconds its run folder records: the ridge fit and scoring, or the sum of the epochs."""
    import json

    out = {}
    for fold, f in run["fold_results"].items():
        folder = ws.root / f["run_dir"]
        log = folder / "log.jsonl"
        if log.is_file():
            out[fold] = round(sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line), 1)
        else:
            out[fold] = json.loads((folder / "metrics.json").read_text())["ridge"]["seconds"]
    return out


def _run_name(head: dict) -> str:
    from train.config import TrainConfig

    return TrainConfig(dataset="demo", encoder="x", fold="P1", **head).run_name


if __name__ == "__main__":
    main()
