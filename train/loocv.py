"""`train loocv`: every fold of every (encoder, mode), then the comparison file (DESIGN §7).

``results/<dataset>/encoder_loocv_comparison.json`` keeps the reference study's keys —
``summary``, ``methodology``, ``results.<run>.{encoder, frozen, pearson_r, spearman_rho,
ssim_st, mse}`` as ``{mean, std}`` and ``results.<run>.fold_results.test_<P>.{pearson_r, mse}`` —
and adds ours: ``pcc_gene`` (primary), per-gene means, the noise ceiling, baselines. Summary
statistics over folds are the mean and the population standard deviation (ddof 0), as the
reference study reported. Our ``pearson_r`` is ``pcc_global``; our ``ssim_st`` is real SSIM.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone

import numpy as np

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from train.config import MODES, TrainConfig
from train.data import FoldInputs
from train.run import train_fold

# Summarised over folds from fold_results; pearson_r is our pcc_global, spearman_rho our spearman_gene.
SUMMARY_KEYS = ("pearson_r", "spearman_rho", "ssim_st", "mse", "pcc_gene")


def _job(task: tuple) -> tuple:
    cfg, workspace, runtime, jobs = task
    if jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    res = train_fold(cfg, workspace, **runtime)
    return cfg.encoder, cfg.mode, cfg.fold, str(res.run_dir), res.metrics


def loocv_configs(
    dataset: str, encoders: list[str], modes: list[str], folds: list[str], options: dict
) -> list[TrainConfig]:
    """One TrainConfig per (encoder, mode, fold); fine-tune-only options apply to fine-tune runs only."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise FeatcacheError(f"--modes: unknown mode(s) {', '.join(unknown)}; use {', '.join(MODES)}.")
    if not encoders or not modes:
        raise FeatcacheError("--encoders and --modes each need at least one name.")
    return [
        TrainConfig.from_options(dataset=dataset, encoder=e, mode=m, fold=f, **options).validate()
        for e in encoders
        for m in modes
        for f in folds
    ]


def run_loocv(
    dataset: str,
    encoders: list[str],
    modes: list[str],
    options: dict | None = None,
    jobs: int = 1,
    workspace=None,
    device: str = "auto",
    in_memory: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Train every fold of every (encoder, mode) and write the comparison file.

    Every feature store is checked before any training starts; ``options`` are TrainConfig fields.
    """
    ws = Workspace.resolve(workspace)
    ds = ws.open_dataset(dataset)
    if len(ds.patients) < 2:
        raise FeatcacheError(
            f"dataset {dataset!r} has {len(ds.patients)} patient(s); leave-one-patient-out needs two or more."
        )
    if jobs < 1:
        raise FeatcacheError(f"--jobs {jobs}: must be at least 1.")
    configs = loocv_configs(dataset, encoders, modes, list(ds.patients), options or {})
    for e, random in {(c.encoder, c.mode == "random") for c in configs if not c.finetune}:
        FoldInputs(ds, ws.feature_store(dataset, e, random))
    runtime = {
        "device": device,
        "in_memory": in_memory,
        "overwrite": overwrite,
        "show_progress": show_progress and jobs == 1,
    }
    tasks = [(cfg, str(ws.root), runtime, jobs) for cfg in configs]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_job, tasks))
    else:
        done = [_job(t) for t in tasks]
    return write_comparison(ws, dataset, done, options or {})


def _summary(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=0)) if len(v) else None,
        "n": int(len(v)),
    }


def write_comparison(ws: Workspace, dataset: str, done, settings: dict) -> dict:
    runs: dict[str, dict] = {}
    for encoder, mode, fold, run_dir, m in done:
        key = f"{encoder}_{m.get('run', mode)}"
        r = runs.setdefault(
            key,
            {
                "encoder": encoder,
                "mode": mode,
                "run": m.get("run", mode),
                "frozen": mode in ("frozen", "random"),
                "fold_results": {},
                "per_gene_pcc": {},
            },
        )
        if mode == "random":
            r["encoder_weights"] = m.get("features_weights")
        r["fold_results"][f"test_{fold}"] = {
            "pearson_r": m["pcc_global"],
            "mse": m["mse"],
            "pcc_gene": m["pcc_gene"],
            "spearman_rho": m["spearman_gene"],
            "ssim_st": m["ssim_st"],
            "selected_epoch": m.get("selected_epoch"),
            "run_dir": run_dir,
            "noise_ceiling_pcc_gene": (m.get("noise_ceiling") or {}).get("pcc_gene"),
            "baseline_mean_mse": m["baselines"]["per_gene_mean"]["mse"],
        }
        for g, v in m["per_gene"].items():
            r["per_gene_pcc"].setdefault(g, []).append(v["pcc"])
    for r in runs.values():
        folds = r["fold_results"].values()
        for k in SUMMARY_KEYS:
            r[k] = _summary([f[k] for f in folds])
        r["noise_ceiling_pcc_gene"] = _summary([f["noise_ceiling_pcc_gene"] for f in folds])
        r["per_gene_pcc"] = {g: _summary(v)["mean"] for g, v in r["per_gene_pcc"].items()}
    results = ws.results(dataset)
    old = results.read_comparison() or {}
    merged = {**old.get("results", {}), **runs}
    best = max(merged, key=lambda k: merged[k]["pcc_gene"]["mean"] or -1) if merged else None
    out = {
        "summary": {
            "dataset": dataset,
            "runs": sorted(merged),
            "best_by_pcc_gene": best,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "methodology": {
            "evaluation": "leave-one-patient-out; validation split from the training patients only (spatial blocks); "
            "epoch selected on validation pcc_gene; the test patient scored once",
            "decoder": "Img2ST-Net MiniUNet (DESIGN §5) unless the run name says otherwise",
            "targets": "log1p(CP10k) z-scored per gene with training-patient statistics; in-tissue bins only",
            "pearson_r": "pcc_global: one Pearson over all flattened in-tissue values (the reference study's pearson_r)",
            "pcc_gene": "primary: Pearson per gene over in-tissue test bins, mean over genes",
            "ssim_st": "2-D SSIM of each gene's 32×32 map (7×7 uniform window); the reference code's ssim_st "
            "was a clipped correlation, so the two are not comparable",
            "std": "population standard deviation over folds (ddof 0)",
            "settings": settings,
        },
        "results": merged,
    }
    out["_path"] = str(results.write_comparison(out))
    return out


__all__ = ["run_loocv", "write_comparison"]
