"""``analysis compare``: is run B better than run A on new patients? Paired statistics between runs.

A *run* is a key of the comparison file with all its seeds' folders; each folder is identified by
its own ``config.json`` (fold, seed), never by its name. A pair (A, B) is compared on the folds
both have (none in common is refused; folds only one has are listed) and, in each fold, on the
seeds both have.

* **The difference.** Each seed's per-gene Pearson r over the test patient's scored bins (each bin
  once, overlapping patches averaged), against that folder's own stored truth, averaged over genes:
  its pcc_gene. Pearson is invariant to a per-gene affine change of the target, so runs whose
  z-score statistics differ (another seed's validation split) compare on the same footing; targets
  that are not affinely related (another ``--target``) are refused. Per fold: mean over B's seeds
  − mean over A's seeds; the reported difference is the mean over folds.
* **The interval** counts both sources of error. Test bins: a bootstrap that resamples spatial
  blocks of each test patient (``block_bins`` square, 64 by default), not bins, since neighbouring
  bins are correlated; A and B (and their seeds) are resampled together, paired. Training: the
  spread of pcc_gene between seeds of a run on the same fold (unbiased variance / number of seeds).
  The 95 % interval is difference ± t × √(spatial variance + training variance), t with the
  Welch–Satterthwaite degrees of freedom of the seed variances (few seeds: a wide t). With one
  seed per run the training variance is unknown: the interval then covers the test bins only and
  says so. A fold with fewer than ``MIN_BLOCKS`` blocks is refused (a bootstrap over one block has
  zero width).
* Per-gene differences and the count of genes favouring B are descriptive only: genes share the
  spatially varying error, so no test over genes is reported.

Per-gene correlations of a resample come from per-block sufficient statistics (counts, sums,
squares and cross-products), so thousands of resamples cost little. Written to
``results/<dataset>/paired_comparison.json`` and drawn as ``figures/paired_comparison``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats

from analysis.api import section_bins
from featcache.errors import FeatcacheError
from featcache.stores import RunDir, Workspace

BLOCK_BINS = 64
MIN_BOOT = 100
MIN_BLOCKS = 8  # spatial blocks per fold the bootstrap needs


def _stats(pred: np.ndarray, truth: np.ndarray, blocks: np.ndarray, n_blocks: int | None = None) -> np.ndarray:
    """Per block and gene: n, Σp, Σt, Σp², Σt², Σpt — shape (blocks, 6, genes)."""
    n_blocks, g = (blocks.max() + 1 if n_blocks is None else n_blocks), pred.shape[1]
    out = np.zeros((n_blocks, 6, g))
    for k, term in enumerate((np.ones_like(pred), pred, truth, pred * pred, truth * truth, pred * truth)):
        np.add.at(out[:, k], blocks, term)
    return out


def _pearson(s: np.ndarray) -> np.ndarray:
    """Per-gene Pearson r from summed statistics (..., 6, genes); NaN: constant truth; 0: constant prediction."""
    n, sp, st, spp, stt, spt = np.moveaxis(s, -2, 0)
    vp, vt = n * spp - sp * sp, n * stt - st * st
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (n * spt - sp * st) / np.sqrt(vp * vt)
    r = np.where(vp > 1e-9 * np.maximum(n * spp, 1e-300), r, 0.0)
    return np.where(vt > 1e-9 * np.maximum(n * stt, 1e-300), r, np.nan)


def _fold_table(ws: Workspace, run_dir: str):
    """(sample, row, col) keys, predictions and truth (bins × genes) of one run's test bins, overlaps averaged."""
    try:
        ds = RunDir(ws.root / run_dir).open_predictions()
    except FeatcacheError:
        raise
    except Exception as e:  # a damaged predictions.zarr
        raise FeatcacheError(
            f"{run_dir}: its predictions.zarr cannot be read ({type(e).__name__}); retrain that fold or remove the "
            "folder and run `train summarize` again."
        ) from None
    keys, preds, truths = [], [], []
    for s, coords, p, t, _ in section_bins(ds):
        keys.append(np.column_stack([np.full(len(coords), s, dtype=object), coords]))
        preds.append(p)
        truths.append(t)
    return np.concatenate(keys), np.concatenate(preds), np.concatenate(truths), [str(g) for g in ds["gene"].values]


def run_folders(ws: Workspace, key: str, entry: dict) -> dict[str, dict[int, str]]:
    """{fold: {seed: run folder}} of one run of the comparison file, read from each folder's config.json."""
    listed = []
    for f in entry["fold_results"].values():
        listed += [p["run_dir"] for p in f["per_seed"]] if f.get("per_seed") else [f["run_dir"]]
    out: dict[str, dict[int, str]] = {}
    for d in listed:
        cfg = RunDir(ws.root / d).read_config()
        if cfg is None:
            raise FeatcacheError(f"run {key}: {d} has no config.json; run `train summarize` again.")
        fold, seed = str(cfg["fold"]), int(cfg.get("seed", 0))
        if seed in out.setdefault(fold, {}):
            raise FeatcacheError(
                f"run {key}: fold {fold} seed {seed} is in two folders ({out[fold][seed]} and {d}); remove one and run "
                "`train summarize` again."
            )
        out[fold][seed] = d
    return out


def paired_comparison(
    dataset: str,
    runs: list[str] | None = None,
    workspace=None,
    n_boot: int = 2000,
    seed: int = 0,
    block_bins: int = BLOCK_BINS,
) -> dict:
    """Compare every pair of the given runs (default: every run of the comparison file); write and return it.

    ``n_boot``: bootstrap resamples of spatial blocks (at least MIN_BOOT: fewer make the interval's ends noise);
    ``block_bins``: the side of a spatial block, in bins.
    """
    if n_boot < MIN_BOOT:
        raise FeatcacheError(f"--bootstrap {n_boot}: use at least {MIN_BOOT} resamples.")
    if block_bins < 1:
        raise FeatcacheError(f"--block-bins {block_bins}: use a positive block side (default {BLOCK_BINS}).")
    ws = Workspace.resolve(workspace)
    results = ws.results(dataset)
    comparison = results.read_comparison(required=True)["results"]
    runs = runs or sorted(comparison)
    unknown = [r for r in runs if r not in comparison]
    if unknown or len(runs) < 2:
        raise FeatcacheError(
            f"--runs: {'unknown run(s) ' + ', '.join(unknown) if unknown else 'name at least two runs'}"
            f"; the comparison file has {', '.join(sorted(comparison))}."
        )
    folders = {r: run_folders(ws, r, comparison[r]) for r in runs}
    cache: dict[str, tuple] = {}

    def table(d: str):
        if d not in cache:
            cache[d] = _fold_table(ws, d)
        return cache[d]

    rng = np.random.default_rng(seed)
    pairs = [_pair(a, b, folders[a], folders[b], table, n_boot, block_bins, rng) for a, b in combinations(runs, 2)]
    out = {
        "dataset": dataset,
        "method": {
            "difference": "B − A of pcc_gene (Pearson per gene over the test patient's scored bins against the "
            "run folder's own truth, mean over genes): per fold the mean over B's seeds minus the mean over A's "
            "seeds, then the mean over the folds both runs have; Pearson is invariant to per-gene affine "
            "differences of the targets (the z-score statistics)",
            "interval": f"95 %: difference ± t × sqrt(spatial + training variance). Spatial: bootstrap ({n_boot} "
            f"resamples, seed {seed}) of {block_bins}×{block_bins}-bin blocks of each test patient, A and B "
            "resampled together; training: the variance of pcc_gene between a run's seeds on the same fold over "
            "its number of seeds; t with Welch–Satterthwaite degrees of freedom. With one seed per run the "
            "interval excludes training variance (said per pair)",
            "genes": "per-gene differences and genes favouring B are descriptive: genes share spatial error, so "
            "no test over genes is made",
            "bins": "each scored bin once (overlapping patches averaged)",
            "min_blocks_per_fold": MIN_BLOCKS,
        },
        "pairs": pairs,
    }
    out["_path"] = str(results.write_paired(out))
    return out


def _pair(a: str, b: str, fa: dict, fb: dict, table, n_boot: int, block_bins: int, rng) -> dict:
    folds = sorted(set(fa) & set(fb))
    if not folds:
        raise FeatcacheError(
            f"runs {a} and {b} share no fold ({a}: {', '.join(sorted(fa))}; {b}: {', '.join(sorted(fb))}); "
            "compare runs tested on the same patients."
        )
    fold_stats, per_gene, seeds = [], [], {}
    for f in folds:
        common = sorted(set(fa[f]) & set(fb[f]))
        if not common:
            raise FeatcacheError(
                f"runs {a} and {b} share no seed in fold {f} ({a}: {sorted(fa[f])}; {b}: {sorted(fb[f])}); train "
                "the same --seeds for both."
            )
        seeds[f] = common
        ta, tb = [table(fa[f][s]) for s in common], [table(fb[f][s]) for s in common]
        keys, _, truth0, genes = ta[0]
        for t in ta[1:] + tb:
            _same_bins(a, b, f, keys, truth0, genes, t)
        block_key = [f"{s}:{int(r) // block_bins}:{int(c) // block_bins}" for s, r, c in keys]
        blocks = np.unique(block_key, return_inverse=True)[1].ravel()
        n_blocks = int(blocks.max()) + 1
        if n_blocks < MIN_BLOCKS:
            raise FeatcacheError(
                f"fold {f}: its test bins fill {n_blocks} spatial block(s) of {block_bins}×{block_bins} bins, and the "
                f"bootstrap needs at least {MIN_BLOCKS} (over fewer the interval is as narrow as it is wrong); "
                f"pass a smaller --block-bins (e.g. {max(1, block_bins // 2)}), knowing that blocks smaller than "
                "the reach of spatial correlation make the interval too narrow."
            )
        sa = np.stack([_stats(t[1], t[2], blocks, n_blocks) for t in ta])  # (seeds, blocks, 6, genes)
        sb = np.stack([_stats(t[1], t[2], blocks, n_blocks) for t in tb])
        fold_stats.append((sa, sb))
        per_gene.append(np.mean(_pearson(sb.sum(1)), axis=0) - np.mean(_pearson(sa.sum(1)), axis=0))
    res = block_interval(fold_stats, n_boot, rng)
    gene_diff = np.nanmean(np.stack(per_gene), axis=0)
    ok = np.isfinite(gene_diff)
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    notes = []
    if only_a or only_b:
        notes.append(
            f"folds differ: compared on {', '.join(folds)} only"
            + (f"; only {a} has {', '.join(only_a)}" if only_a else "")
            + (f"; only {b} has {', '.join(only_b)}" if only_b else "")
        )
    dropped = {f: (sorted(set(fa[f]) - set(fb[f])), sorted(set(fb[f]) - set(fa[f]))) for f in folds}
    dropped = {f: d for f, d in dropped.items() if d[0] or d[1]}
    if dropped:
        notes.append(
            "seeds differ: "
            + "; ".join(
                f"fold {f} compared on seeds {', '.join(map(str, seeds[f]))}"
                + (f" (only {a} has {', '.join(map(str, da))})" if da else "")
                + (f" (only {b} has {', '.join(map(str, db))})" if db else "")
                for f, (da, db) in dropped.items()
            )
        )
    if not res["training_variance_included"]:
        single = [f for f in folds if len(seeds[f]) < 2]
        notes.append(
            f"one seed in fold(s) {', '.join(single)}: the interval excludes training variance (train both runs with "
            "--seeds 0,1,2 to include it)"
        )
    return {
        "a": a,
        "b": b,
        "mean_pcc_gene_difference": res["difference"],
        "ci95": res["ci95"],
        "excludes_zero": bool(res["ci95"][0] > 0 or res["ci95"][1] < 0),
        "se_spatial": res["se_spatial"],
        "se_training": res["se_training"],
        "dof": res["dof"],
        "training_variance_included": res["training_variance_included"],
        "per_fold": dict(zip(folds, res["per_fold"])),
        "folds": folds,
        "folds_only_in_a": only_a,
        "folds_only_in_b": only_b,
        "seeds": seeds,
        "notes": notes,
        "n_genes": int(ok.sum()),
        "genes_favouring_b": int((gene_diff[ok] > 0).sum()),
        "per_gene_difference": {g: (float(v) if np.isfinite(v) else None) for g, v in zip(genes, gene_diff)},
    }


def _same_bins(a: str, b: str, fold: str, keys, truth, genes, other) -> None:
    """Refuse folders of a pair that scored other bins or genes, or whose targets are not affinely related."""
    keys_o, _, truth_o, genes_o = other
    if genes != genes_o or len(keys) != len(keys_o) or not np.array_equal(keys, keys_o):
        raise FeatcacheError(
            f"runs {a} and {b} scored different bins or genes in fold {fold}; compare runs of the same dataset and "
            "scoring (--score)."
        )
    r = _pearson(_stats(truth, truth_o, np.zeros(len(truth), np.int64)).sum(0))
    if np.any(np.isfinite(r) & (r < 0.9999)):
        raise FeatcacheError(
            f"runs {a} and {b} have targets in fold {fold} that are not one per-gene rescaling of the other (another "
            "--target?); their correlations are not comparable."
        )


def block_interval(fold_stats: list, n_boot: int, rng, level: float = 0.95) -> dict:
    """The difference B − A of pcc_gene and its interval from per-block statistics of every seed, fold by fold.

    ``fold_stats``: per fold (A, B), each (seeds, blocks, 6, genes) as :func:`_stats` makes them. Blocks are
    resampled with the same weights for A and B and all seeds (paired); the training variance is the
    between-seed variance of each run's pcc_gene on the fold over its seed count.
    """
    n_folds = len(fold_stats)
    observed, boots, train_parts = [], [], []
    for sa, sb in fold_stats:
        ra = np.nanmean(_pearson(sa.sum(1)), axis=-1)  # (seeds,) pcc_gene
        rb = np.nanmean(_pearson(sb.sum(1)), axis=-1)
        observed.append(float(rb.mean() - ra.mean()))
        n_blocks = sa.shape[1]
        w = rng.multinomial(n_blocks, np.full(n_blocks, 1 / n_blocks), size=n_boot).astype(np.float64)
        boot_a = np.nanmean(_pearson(np.einsum("kb,sbmg->ksmg", w, sa)), axis=-1).mean(axis=1)  # (boot,)
        boot_b = np.nanmean(_pearson(np.einsum("kb,sbmg->ksmg", w, sb)), axis=-1).mean(axis=1)
        boots.append(boot_b - boot_a)
        for r in (ra, rb):
            if len(r) > 1:
                train_parts.append((np.var(r, ddof=1) / len(r) / n_folds**2, len(r) - 1))
    var_spatial = float(np.var(np.mean(np.stack(boots), axis=0), ddof=1))
    included = len(train_parts) == 2 * n_folds
    var_train = float(sum(v for v, _ in train_parts)) if included else 0.0
    total = var_spatial + var_train
    denom = sum(v * v / d for v, d in train_parts) if included else 0.0
    dof = float(total * total / denom) if denom > 0 else float("inf")
    q = float(stats.t.ppf(0.5 + level / 2, dof)) if np.isfinite(dof) else float(stats.norm.ppf(0.5 + level / 2))
    diff = float(np.mean(observed))
    half = float(q * np.sqrt(total))
    return {
        "difference": diff,
        "ci95": [diff - half, diff + half],
        "se_spatial": float(np.sqrt(var_spatial)),
        "se_training": float(np.sqrt(var_train)) if included else None,
        "dof": dof if np.isfinite(dof) else None,
        "training_variance_included": included,
        "per_fold": observed,
    }


def comparison_figure(res: dict, out: Path) -> list[Path]:
    """One row per pair: the mean pcc_gene difference (B − A) with its 95 % interval, zero marked."""
    from analysis.figures import _figure, _save, _style

    pairs = res["pairs"]
    with _style():
        fig, ax = _figure(6.5, 0.45 * len(pairs) + 1.4)
        y = np.arange(len(pairs))
        mean = np.array([p["mean_pcc_gene_difference"] for p in pairs])
        lo, hi = np.array([p["ci95"][0] for p in pairs]), np.array([p["ci95"][1] for p in pairs])
        for k in range(len(pairs)):
            colour = "#0072B2" if pairs[k]["excludes_zero"] else "#999999"
            ax.errorbar(
                mean[k],
                y[k],
                xerr=[[mean[k] - lo[k]], [hi[k] - mean[k]]],
                fmt="o",
                color=colour,
                capsize=3,
                lw=1.5,
                ms=5,
            )
        ax.axvline(0, color="black", lw=0.8)
        labels = [
            f"{p['b']} − {p['a']}" + ("" if p["training_variance_included"] else "  (one seed: no training variance)")
            for p in pairs
        ]
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("difference in pcc_gene (mean over folds), 95 % interval (test blocks and seeds)")
        ax.set_title("Paired comparison of runs (blue: interval excludes 0)")
        return _save(fig, out, "paired_comparison")
