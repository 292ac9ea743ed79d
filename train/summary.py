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
    "pcc_gene_patch": "pcc_gene_patch",  # HEST-Benchmark's patch-level metric (train/scales.py)
    "pcc_gene_16um": "pcc_gene_16um",
    "pcc_gene_32um": "pcc_gene_32um",
}
# settings that differ between the folds of one run by design
PER_FOLD = {"fold", "train_samples", "test_samples", "config_sha256", "provenance"}


def run_key(encoder: str, mode: str, run: str) -> str:
    """The run's key in the comparison file: encoder, mode and variant, the weights' kind included (the run name
    of a fine-tune from random weights says ``randomweights``); seeds of one setup share a key."""
    if run == mode and (encoder, mode) in REFERENCE_KEYS:
        return f"{REFERENCE[encoder][0]}_{MODE_WORDS[mode]}"
    return f"{encoder}_{run}"


def config_key(cfg: dict) -> str:
    """The run key of a fold's config.json."""
    return run_key(cfg["encoder"], cfg["mode"], cfg["run"])


STD_DDOF = 0  # the reference study's population std, over folds and over seeds alike


def _stat(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=STD_DDOF)) if len(v) else None,
        "n": int(len(v)),
    }


def _non_finite(obj, where: str = "") -> str | None:
    """The path of the first NaN or ±inf in a JSON value, or None."""
    if isinstance(obj, dict):
        return next((w for k, v in obj.items() if (w := _non_finite(v, f"{where}.{k}" if where else k))), None)
    if isinstance(obj, list):
        return next((w for i, v in enumerate(obj) if (w := _non_finite(v, f"{where}[{i}]"))), None)
    if isinstance(obj, float) and not np.isfinite(obj):
        return where or "(the value)"
    return None


def summarize(dataset: str, workspace=None) -> dict:
    """Rebuild and write the comparison file from the dataset's finished run folders; returns it.

    Only complete, comparable runs enter ``results`` (docs/design.md §7): every patient a fold for every seed,
    and every fold trained on this dataset's preparation, from one feature store identity per seed and with one
    set of settings. Other runs are listed under ``incomplete``, ``inconsistent`` or ``foreign`` with the reason.
    """
    ws = Workspace.resolve(workspace)
    ds = ws.open_dataset(dataset)
    found: dict[str, list] = {}
    foreign = []
    unfinished: dict[str, list[str]] = {}  # run key -> fold folders without metrics.json (still training, or killed)
    for rd in ws.runs(dataset):
        if not rd.is_finished():
            c = rd.read_config() or {}
            key = config_key(c) if {"encoder", "mode", "run"} <= set(c) else None
            unfinished.setdefault(key, []).append(str(rd.path.relative_to(ws.root)))
            continue
        cfg, m = rd.read_config(), rd.read_metrics()
        rel = str(rd.path.relative_to(ws.root))
        bad = _non_finite(m)
        if bad:
            raise FeatcacheError(
                f"{rd.file('metrics.json')} holds a non-finite value at {bad!r}; a finished run's metrics are finite "
                "numbers or null. Delete the run folder and train it again (or restore the file)."
            )
        if cfg.get("dataset_fingerprint") != ds.fingerprint:
            foreign.append(
                {
                    "run_dir": rel,
                    "dataset_fingerprint": cfg.get("dataset_fingerprint"),
                    "reason": f"trained on another preparation of the data (dataset fingerprint "
                    f"{str(cfg.get('dataset_fingerprint'))[:12]}, not {ds.fingerprint[:12]} of dataset {dataset!r} "
                    "now): never merged",
                }
            )
            continue
        found.setdefault(config_key(cfg), []).append((cfg, m, rel))
    if not found and not foreign:
        waiting = sorted(p for paths in unfinished.values() for p in paths)
        raise FeatcacheError(
            f"no finished run folders under {ws.runs_dir(dataset)}"
            + (f" (unfinished (no metrics.json): {', '.join(waiting)})" if waiting else "")
            + "; train with `train loocv` (or copy run folders there) first."
        )
    runs, incomplete, inconsistent = {}, {}, {}
    for key, folds in sorted(found.items()):
        problem = _inconsistency(folds)
        if problem:
            inconsistent[key] = _listed(folds, problem)
            continue
        missing = _missing(folds, list(ds.patients))
        if missing:
            if unfinished.get(key):
                missing += f"; unfinished (no metrics.json): {', '.join(sorted(unfinished[key]))}"
            incomplete[key] = _listed(folds, missing)
            continue
        runs[key] = _entry(folds)
    for key, paths in sorted(unfinished.items(), key=lambda kv: str(kv[0])):
        if key is None or key not in found:  # no fold of the run has finished yet
            incomplete[str(key or "unknown run")] = {
                "reason": f"unfinished (no metrics.json): {', '.join(sorted(paths))}",
                "folds": [],
                "seeds": [],
                "run_dirs": sorted(paths),
            }
    scored = [k for k in runs if runs[k]["pcc_gene"]["mean"] is not None]
    best = max(scored, key=lambda k: runs[k]["pcc_gene"]["mean"]) if scored else None
    out = {
        "title": f"Encoder comparison, leave-one-patient-out, dataset {dataset}",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "summary": _reference_summary(runs),
        "methodology": methodology(ds, runs),
        "results": runs,
        "incomplete": incomplete,
        "inconsistent": inconsistent,
        "foreign": foreign,
        "about": {
            "dataset": dataset,
            "dataset_fingerprint": ds.fingerprint,
            "runs": sorted(runs),
            "patients": list(ds.patients),
            "best_by_pcc_gene": best,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    out["_path"] = str(ws.results(dataset).write_comparison({k: v for k, v in out.items() if k != "_path"}))
    return out


def _lr_chosen(folds: list) -> list:
    """One trial per (fold, seed): with an lr grid, the trial with the best validation pcc_gene."""
    by: dict[tuple, list] = {}
    for f in folds:
        by.setdefault((f[0]["fold"], f[0].get("seed", 0)), []).append(f)

    def score(f):
        val = f[1].get("val_pcc_gene")
        return (-9.0 if val is None else val, -(f[0].get("lr") or 0))  # ties: the smaller lr

    return [max(t, key=score) for t in by.values()]


def _weights(cfg: dict):
    return (cfg.get("features") or {}).get("identity", {}).get("weights") or cfg.get("encoder_weights")


def _settings(cfg: dict) -> dict:
    """What every fold and seed of one run must share: the settings and the inputs' identity, less what differs
    by design (fold, seed, a random encoder's seed, the lr of an lr-grid trial)."""
    out = {k: v for k, v in cfg.items() if k not in PER_FOLD and k not in ("genes", "features", "seed")}
    ident = dict((cfg.get("features") or {}).get("identity") or {})
    if str(ident.get("weights", "")).startswith("random:"):
        ident.pop("weights")
    # a store's intermediate layers shape only runs that read one: others compare the store without them
    layers = ident.pop("layers", None) or {}
    if cfg.get("layer") is not None:
        ident["layer_read"] = layers.get(f"tokens_{cfg['layer']}")
    if str(out.get("encoder_weights", "")).startswith("random:"):
        out.pop("encoder_weights")
    if cfg.get("lr_grid"):
        out.pop("lr", None)
    return {**out, "features_identity": ident}


def _inconsistency(folds: list) -> str | None:
    """Why the folds of one key are not one run (or None): duplicate folds, differing settings or stores."""
    seen: dict[tuple, str] = {}
    for cfg, _, rel in folds:
        k = (cfg["fold"], cfg.get("seed", 0), cfg["lr"] if cfg.get("lr_grid") else None)
        if k in seen:
            return f"fold {k[0]} seed {k[1]} has two run folders ({seen[k]}, {rel}); delete one and summarize again"
        seen[k] = rel
    first = _settings(folds[0][0])
    for cfg, _, rel in folds[1:]:
        other = _settings(cfg)
        if other != first:
            diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            return f"{rel} was trained with other settings or inputs than {folds[0][2]} ({', '.join(diff[:5])})"
    by_seed: dict[int, set] = {}
    for cfg, _, _ in folds:
        by_seed.setdefault(cfg.get("seed", 0), set()).add(str(_weights(cfg)))
    for seed, weights in sorted(by_seed.items()):
        if len(weights) > 1:
            return f"the folds of seed {seed} read different weights ({', '.join(sorted(weights))})"
    for cfg, _, rel in folds:  # a run is what its inputs were (folders copied in, or trained by older versions)
        problem = _identity_problem(cfg, rel)
        if problem:
            return problem
    return None


def _identity_problem(cfg: dict, rel: str) -> str | None:
    """Why a fold's mode or run name contradicts the weights it read (docs/design.md §7), or None."""
    seed, weights, mode = cfg.get("seed", 0), str(_weights(cfg)), cfg["mode"]
    if mode == "random" and weights != f"random:{seed}":
        return (
            f"{rel} is seed {seed} of a random-init run but read {weights} features, not random:{seed}; train "
            f"that seed again (`train loocv --seeds` extracts random:{seed}) or remove the folder"
        )
    if mode == "frozen" and weights.startswith("random:"):
        return (
            f"{rel} says mode frozen but read random-init features ({weights}): it is a random-init result; train "
            "it with --mode random (or remove the folder)"
        )
    if mode == "finetune" and weights.startswith("random:") and "randomweights" not in str(cfg.get("run")).split("-"):
        return (
            f"{rel} was fine-tuned from random weights ({weights}) but is named {cfg.get('run')!r}, the pretrained "
            "fine-tune's key; train it again (its run name then says randomweights) or remove the folder"
        )
    return None


def _missing(folds: list, patients: list[str]) -> str | None:
    """Why the run is not complete (or None): every patient must be a fold of every seed (and lr trial)."""
    grid = folds[0][0].get("lr_grid") or [None]
    for seed in sorted({cfg.get("seed", 0) for cfg, _, _ in folds}):
        for lr in grid:
            have = {c["fold"] for c, _, _ in folds if c.get("seed", 0) == seed and (lr is None or c["lr"] == lr)}
            lack = [p for p in patients if p not in have]
            if lack:
                trial = f" lr {lr:g}" if lr is not None else ""
                return (
                    f"seed {seed}{trial} has {len(have)} of {len(patients)} folds (missing {', '.join(lack)}); "
                    "train them (`train loocv` trains every fold) to enter results"
                )
    return None


def _listed(folds: list, reason: str) -> dict:
    return {
        "reason": reason,
        "folds": sorted({c["fold"] for c, _, _ in folds}),
        "seeds": sorted({c.get("seed", 0) for c, _, _ in folds}),
        "run_dirs": sorted(rel for _, _, rel in folds),
    }


def _entry(folds: list) -> dict:
    """A complete run: per fold the mean over seeds (each seed's entry under ``per_seed``); over folds mean and
    std of the fold values; over seeds the std of each seed's LOOCV mean."""
    chosen = _lr_chosen(folds)
    cfg0 = chosen[0][0]
    enc, mode = cfg0["encoder"], cfg0["mode"]
    seeds = sorted({c.get("seed", 0) for c, _, _ in chosen})
    fold_results, per_gene = {}, {}
    for fold in sorted({c["fold"] for c, _, _ in chosen}):
        entries = sorted(
            (_fold_result(c, m, rel) for c, m, rel in chosen if c["fold"] == fold), key=lambda e: e["seed"]
        )
        merged = {k: _stat(e[k] for e in entries)["mean"] for k in FOLD_KEYS}
        merged.update({k: entries[0][k] for k in ("run_dir", "test_samples", "noise_ceiling_pcc_gene")})
        merged.update({k: entries[0][k] for k in ("noise_ceiling_pcc_gene_mc_error", "baseline_mean_mse")})
        merged["features_weights"] = entries[0]["features_weights"]
        # the floor depends on the fold's truth and training mean only, so every seed has the same one
        merged["floor"] = {k: _stat(e["floor"].get(k) for e in entries)["mean"] for k in entries[0]["floor"]}
        merged["per_seed"] = entries
        if cfg0.get("lr_grid"):
            merged["lr_selected"] = [e["lr"] for e in entries]
        fold_results[f"test_{fold}"] = merged
        for c, m, _ in chosen:
            if c["fold"] == fold:
                for g, v in m["per_gene"].items():
                    per_gene.setdefault(g, {}).setdefault(fold, []).append(v["pcc"])
    entry = {
        "encoder": REFERENCE.get(enc, (enc, enc))[1],
        "encoder_name": enc,
        "mode": mode,
        "run": cfg0["run"],
        "loss": cfg0.get("loss_kind", "mse"),  # train/losses.py; metrics are in target space whatever the loss
        "frozen": mode != "finetune",
        "default_protocol": cfg0["run"] == mode,
        **({"layer": cfg0["layer"]} if cfg0.get("layer") is not None else {}),  # trained on tokens_<layer>
        "seeds": seeds,
        "fold_results": fold_results,
    }
    for k in FOLD_KEYS:
        entry[k] = _stat(f[k] for f in fold_results.values())
        by_seed = [
            _stat(e[k] for f in fold_results.values() for e in f["per_seed"] if e["seed"] == s)["mean"] for s in seeds
        ]
        entry[k]["std_over_seeds"] = _stat(by_seed)["std"] if len(seeds) > 1 else None
        entry[k]["n_seeds"] = len(seeds)
    entry["noise_ceiling_pcc_gene"] = _stat(f["noise_ceiling_pcc_gene"] for f in fold_results.values())
    errors = [f["noise_ceiling_pcc_gene_mc_error"] for f in fold_results.values()]
    if all(e is not None for e in errors) and errors:  # independent folds: the mean's error adds in quadrature
        entry["noise_ceiling_pcc_gene"]["mc_error"] = float(np.sqrt(np.sum(np.square(errors))) / len(errors))
    entry["floor"] = {k: _stat(f["floor"].get(k) for f in fold_results.values()) for k in FOLD_KEYS}
    entry["floor"] = {k: v for k, v in entry["floor"].items() if v["n"]}
    entry["per_gene_pcc"] = {
        g: _stat(_stat(v)["mean"] for v in by_fold.values())["mean"] for g, by_fold in per_gene.items()
    }
    settings = _settings(cfg0)
    settings.pop("features_identity")
    entry["settings"] = {**settings, "seeds": seeds}
    entry["settings_consistent_across_folds"] = True  # inconsistent runs are listed under ``inconsistent``
    weights = sorted({str(_weights(c)) for c, _, _ in chosen})
    entry["encoder_weights"] = weights[0] if len(weights) == 1 else weights
    return entry


def _fold_result(cfg: dict, m: dict, run_dir: str) -> dict:
    out = {"seed": cfg.get("seed", 0), **{k: m.get(src) for k, src in FOLD_KEYS.items()}}
    ceiling = m.get("noise_ceiling") or {}
    out.update(
        {
            "selected_epoch": m.get("selected_epoch"),
            "run_dir": run_dir,
            "test_samples": m.get("test_samples"),
            "noise_ceiling_pcc_gene": ceiling.get("pcc_gene"),
            "noise_ceiling_pcc_gene_mc_error": ceiling.get("pcc_gene_mc_error"),
            "baseline_mean_mse": m["baselines"]["per_gene_mean"]["mse"],
            "floor": _floor(m),
            "genes_constant_in_truth": len(m.get("genes_constant_in_truth", [])),
            "genes_constant_prediction": len(m.get("genes_constant_prediction", [])),
            "features_weights": m.get("features_weights"),
            "val_pcc_gene": m.get("val_pcc_gene"),
            "ridge_alpha": (m.get("ridge") or {}).get("alpha"),
            "lr": cfg.get("lr"),
        }
    )
    return out


def _floor(m: dict) -> dict:
    """The training-mean prediction's score for each metric of the comparison file (metrics.json's baselines)."""
    base = (m.get("baselines") or {}).get("per_gene_mean") or {}
    return {k: base.get(src) for k, src in FOLD_KEYS.items() if src in base}


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
        "only (a compact region of 64×64-bin blocks per training section; training patches within one patch width, "
        "32 bins edge to edge, of it are left out of training); with an lr grid, the learning rate is chosen the "
        "same way per fold and seed (lr_selected). The test patient is scored once. The reference study selected "
        "its epoch on the test patient. Ridge runs (HEST-Benchmark's head) have no epochs: their α comes from "
        "inner leave-one-patient-out folds over the training patients (settings.selection; per fold ridge_alpha).",
        "target_transform": {
            "log1p-cp10k": "log1p(counts per 10k Gene Expression UMIs of the bin), z-scored per gene "
            "with statistics of every in-tissue bin of the training patients (the validation region included, so a "
            "fold's truth is the same for every seed); the test patient never contributes",
            "log1p-counts": "log1p(raw counts), the reference pipeline's targets (runs named *-counts)",
        },
        "scored_bins": {
            "in-tissue": "in-tissue bins only (loss, selection, metrics)",
            "all-bins": "every bin of each patch, as the reference pipeline scored (runs named *-allbins)",
        },
        "settings_in_use": sorted(s for s in settings if s),
        "loss": "mse: MSE in target space; poisson, nb (runs *-poisson, *-nb): the likelihood of the raw counts, "
        "rates per 10k UMIs times the bin's library size, each run's predictions mapped into its target space "
        "before selection and scoring (config.json to_target_space), so every loss is scored alike",
        "gene_panel": {
            "rule": genes.get("rule", genes.get("spec")),
            "n_genes": len(genes["ids"]),
            "test_patient_in_panel_choice": genes.get("spec", "").startswith("top-mean:"),
            "note": "a top-mean panel is chosen once over every sample of the dataset, the test patients included; "
            "training_only_panel_overlap says per fold how many of its genes a panel chosen from that fold's "
            "training patients alone would share",
            "training_only_panel_overlap": ds.panel_overlap_per_fold(),
        },
        "metrics": {
            "pearson_r": "one Pearson over all flattened scored values (the reference's pearson_r)",
            "spearman_rho": "one Spearman over all flattened scored values (the reference's spearman_rho)",
            "pcc_gene": "primary: Pearson per gene over scored test bins, mean over genes; genes constant in the "
            "truth left out, a constant prediction scores 0",
            "spearman_gene": "as pcc_gene, on ranks",
            "pcc_gene_patch": "HEST-Benchmark's metric: per-gene Pearson across test patches of the patch means (over "
            "scored bins) of prediction and truth, mean over genes",
            "pcc_gene_16um": "pcc_gene over 2×2-bin blocks: truth from counts and library sizes summed over the "
            "block's scored bins, then the run's transform; prediction: per-bin predictions back to CP10k (averaged) "
            "or counts (summed), then the transform (docs/design.md §6)",
            "pcc_gene_32um": "as pcc_gene_16um over 4×4-bin blocks",
            "ssim_st": "2-D SSIM of each gene's 32×32 map per patch (7×7 uniform window, K1 0.01, K2 0.03), averaged "
            "over the windows centred on scored bins; the reference code's ssim_st was a clipped correlation, so the "
            "two are not comparable",
            "mse": "mean squared error over scored bins and genes, in target space",
            "noise_ceiling_pcc_gene": "synthetic data only: E[target | true rates] scored as a prediction, pcc_gene "
            "corrected for the Monte Carlo noise's bias; its Monte Carlo standard error per fold "
            "(noise_ceiling_pcc_gene_mc_error) and of the mean over folds (noise_ceiling_pcc_gene.mc_error)",
            "floor": "per run and fold, every metric of the training-mean prediction (each gene's training mean on "
            "every bin): what a run must beat to have learned anything",
        },
        "std": f"population standard deviation (ddof {STD_DDOF}), as the reference study reported: ``std`` over the "
        "folds' values (each the mean over seeds), ``std_over_seeds`` over the seeds' leave-one-patient-out means",
        "std_ddof": STD_DDOF,
        "seeds": "each seed is its own run folder (split, initialisation, shuffling and, for random-init, the random "
        "encoder's weights random:<seed>); a fold's value is the mean over seeds, each seed under per_seed",
        "runs_in_results": "only complete, comparable runs: every patient a fold for every seed, every fold on this "
        "dataset's preparation (fingerprint), one feature store identity per seed and one set of settings; the "
        "others are listed under incomplete, inconsistent or foreign with the reason and are never in summary or "
        "best_by_pcc_gene",
    }
