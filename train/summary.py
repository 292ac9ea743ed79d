"""The comparison file, rebuilt from every finished run folder of a dataset (``train summarize``).

``results/<dataset>/encoder_loocv_comparison.json`` is written in the reference study's schema
(img2st-encoder-benchmark), so its ``scripts/generate_figures.py`` reads it unchanged:

* ``results.<key>`` per run: ``encoder`` (display name), ``frozen`` (bool), ``pearson_r``,
  ``spearman_rho``, ``ssim_st``, ``mse`` as ``{mean, std}`` (population std over folds, as the
  reference reported), ``fold_results.test_<fold>.{pearson_r, mse}``. The reference's own runs
  keep its keys (``densenet_frozen``, ``densenet_finetuned``, ``densenet_random_init``,
  ``uni2h_frozen``, ``virchow2_frozen``, ``h_optimus_frozen``); every other run is
  ``<encoder>_<run>``. Beside them: ``pcc_gene`` (primary), ``spearman_gene``, per-gene means,
  the noise ceiling, the run's settings (from its config.json) and its folder.
* ``summary``: ``{family: {"frozen", "finetuned", "random_init"}}`` pearson_r means, as the reference.
* ``methodology``: the protocol in words, and per fold how many panel genes a panel chosen from
  the training patients alone would share.

Runs are read from their own config.json (encoder, mode, fold, settings), never from folder
names, so run folders trained elsewhere and copied in are summarized like local ones.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np

from featcache.errors import FeatcacheError
from featcache.stores import Workspace

# our encoder -> (the reference's key prefix, its display name, its summary family)
REFERENCE = {
    "densenet121": ("densenet", "DenseNet121", "DenseNet"),
    "uni2h": ("uni2h", "UNI2-h", "UNI2-h"),
    "virchow2": ("virchow2", "Virchow2", "Virchow2"),
    "hoptimus0": ("h_optimus", "H-optimus-0", "H-optimus-0"),
}
MODE_WORDS = {"frozen": "frozen", "finetune": "finetuned", "random": "random_init"}
REFERENCE_KEYS = {
    ("densenet121", "frozen"),
    ("densenet121", "finetune"),
    ("densenet121", "random"),
    ("uni2h", "frozen"),
    ("virchow2", "frozen"),
    ("hoptimus0", "frozen"),
}
# comparison key <- metrics.json key; pearson_r and spearman_rho are global, as the reference's were
FOLD_KEYS = {
    "pearson_r": "pcc_global",
    "spearman_rho": "spearman_global",
    "ssim_st": "ssim_st",
    "mse": "mse",
    "pcc_gene": "pcc_gene",
    "spearman_gene": "spearman_gene",
}
# settings that differ between the folds of one run by design
PER_FOLD = {"fold", "train_samples", "test_samples", "config_sha256", "provenance"}


def run_key(encoder: str, mode: str, run: str) -> str:
    """The run's key in the comparison file."""
    if run == mode and (encoder, mode) in REFERENCE_KEYS:
        return f"{REFERENCE[encoder][0]}_{MODE_WORDS[mode]}"
    return f"{encoder}_{run}"


def _stat(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=0)) if len(v) else None,
        "n": int(len(v)),
    }


def summarize(dataset: str, workspace=None) -> dict:
    """Rebuild and write the comparison file from the dataset's finished run folders; returns it."""
    ws = Workspace.resolve(workspace)
    ds = ws.open_dataset(dataset)
    runs: dict[str, dict] = {}
    for rd in ws.runs(dataset):
        if not rd.is_finished():
            continue
        cfg, m = rd.read_config(), rd.read_metrics()
        key = run_key(cfg["encoder"], cfg["mode"], cfg["run"])
        entry = runs.setdefault(key, _new_entry(cfg))
        entry["fold_results"][f"test_{cfg['fold']}"] = _fold_result(m, rd.path.relative_to(ws.root))
        entry["_settings"].append(_settings(cfg))
        for g, v in m["per_gene"].items():
            entry["_per_gene"].setdefault(g, []).append(v["pcc"])
    if not runs:
        raise FeatcacheError(
            f"no finished run folders under {ws.runs_dir(dataset)}; train with `train loocv` (or copy "
            "run folders there) first."
        )
    for entry in runs.values():
        _finish(entry)
    out = {
        "title": f"Encoder comparison, leave-one-patient-out, dataset {dataset}",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "summary": _reference_summary(runs),
        "methodology": methodology(ds, runs),
        "results": dict(sorted(runs.items())),
        "about": {
            "dataset": dataset,
            "runs": sorted(runs),
            "patients": list(ds.patients),
            "best_by_pcc_gene": max(runs, key=lambda k: runs[k]["pcc_gene"]["mean"] or -9),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    out["_path"] = str(ws.results(dataset).write_comparison({k: v for k, v in out.items() if k != "_path"}))
    return out


def _new_entry(cfg: dict) -> dict:
    enc, mode = cfg["encoder"], cfg["mode"]
    return {
        "encoder": REFERENCE.get(enc, (enc, enc))[1],
        "encoder_name": enc,
        "mode": mode,
        "run": cfg["run"],
        "frozen": mode != "finetune",
        "default_protocol": cfg["run"] == mode,
        "fold_results": {},
        "_settings": [],
        "_per_gene": {},
    }


def _fold_result(m: dict, run_dir) -> dict:
    out = {k: m.get(src) for k, src in FOLD_KEYS.items()}
    ceiling = m.get("noise_ceiling") or {}
    out.update(
        {
            "selected_epoch": m.get("selected_epoch"),
            "run_dir": str(run_dir),
            "test_samples": m.get("test_samples"),
            "noise_ceiling_pcc_gene": ceiling.get("pcc_gene"),
            "baseline_mean_mse": m["baselines"]["per_gene_mean"]["mse"],
            "genes_constant_in_truth": len(m.get("genes_constant_in_truth", [])),
            "genes_constant_prediction": len(m.get("genes_constant_prediction", [])),
            "features_weights": m.get("features_weights"),
        }
    )
    return out


def _settings(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in PER_FOLD and k not in ("genes", "features")}


def _finish(entry: dict) -> None:
    folds = entry["fold_results"] = dict(sorted(entry["fold_results"].items()))
    for k in FOLD_KEYS:
        entry[k] = _stat(f[k] for f in folds.values())
    entry["noise_ceiling_pcc_gene"] = _stat(f["noise_ceiling_pcc_gene"] for f in folds.values())
    entry["per_gene_pcc"] = {g: _stat(v)["mean"] for g, v in entry.pop("_per_gene").items()}
    settings = entry.pop("_settings")
    digests = {hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12] for s in settings}
    entry["settings"] = settings[0]
    entry["settings_consistent_across_folds"] = len(digests) == 1
    if entry["mode"] == "random":
        entry["encoder_weights"] = next(iter(folds.values()))["features_weights"]


def _reference_summary(runs: dict) -> dict:
    """{family: {frozen, finetuned, random_init}} of pearson_r means, the reference study's summary block."""
    out: dict[str, dict] = {}
    for r in runs.values():
        if r["default_protocol"]:
            family = REFERENCE.get(r["encoder_name"], (None, None, r["encoder_name"]))[2]
            out.setdefault(family, {"frozen": None, "finetuned": None})[MODE_WORDS[r["mode"]]] = r["pearson_r"]["mean"]
    return out


def methodology(ds, runs: dict) -> dict:
    genes = ds.meta["genes"]
    settings = {r["settings"].get("target") for r in runs.values()} | {
        r["settings"].get("score") for r in runs.values()
    }
    return {
        "cross_validation": f"leave-one-patient-out over {len(ds.patients)} patients ({', '.join(ds.patients)}); a "
        "fold tests on every section of its patient and trains on no section of it",
        "model_selection": "the epoch with the best pcc_gene on a validation region drawn from the training patients "
        "only (a compact region of 64×64-bin blocks per training section, with a one-patch buffer left out of "
        "training); the test patient is scored once. The reference study selected its epoch on the test patient.",
        "target_transform": {
            "log1p-cp10k": "log1p(counts per 10k Gene Expression UMIs of the bin), z-scored per gene "
            "with training-patient statistics",
            "log1p-counts": "log1p(raw counts), the reference pipeline's targets (runs named *-counts)",
        },
        "scored_bins": {
            "in-tissue": "in-tissue bins only (loss, selection, metrics)",
            "all-bins": "every bin of each patch, as the reference pipeline scored (runs named *-allbins)",
        },
        "settings_in_use": sorted(s for s in settings if s),
        "gene_panel": {
            "rule": genes.get("rule", genes.get("spec")),
            "n_genes": len(genes["ids"]),
            "test_patient_in_panel_choice": genes.get("spec", "").startswith("top-mean:"),
            "training_only_panel_overlap": ds.panel_overlap_per_fold(),
        },
        "metrics": {
            "pearson_r": "one Pearson over all flattened scored values (the reference's pearson_r)",
            "spearman_rho": "one Spearman over all flattened scored values (the reference's spearman_rho)",
            "pcc_gene": "primary: Pearson per gene over scored test bins, mean over genes; genes constant in the "
            "truth left out, a constant prediction scores 0",
            "spearman_gene": "as pcc_gene, on ranks",
            "ssim_st": "2-D SSIM of each gene's 32×32 map per patch (7×7 uniform window, K1 0.01, K2 0.03), averaged "
            "over the windows centred on scored bins; the reference code's ssim_st was a clipped correlation, so the "
            "two are not comparable",
            "mse": "mean squared error over scored bins and genes, in target space",
            "noise_ceiling_pcc_gene": "synthetic data only: E[target | true rates] scored as a prediction, pcc_gene "
            "corrected for the Monte Carlo noise's bias (its Monte Carlo error in each fold's metrics.json)",
        },
        "std": "population standard deviation over folds (ddof 0), as the reference study reported",
    }
