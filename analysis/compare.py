"""``analysis compare``: is one encoder really better? Paired statistics between runs.

For each pair of runs (A, B) of the comparison file, on the bins both scored in each fold:

* per-gene paired differences of Pearson r (B − A), per fold, and their mean over folds;
* a Wilcoxon signed-rank test over genes of the fold-mean per-gene differences;
* a 95 % bootstrap interval of the mean pcc_gene difference that resamples spatial blocks of each
  test patient (64 × 64 bins), not bins: neighbouring bins are correlated, so resampling bins
  would make the interval far too narrow. Each fold is resampled on its own and the fold
  differences averaged, like the reported mean over folds.

Per-gene correlations of a resample come from per-block sufficient statistics (counts, sums,
squares and cross-products), so thousands of resamples cost little. Written to
``results/<dataset>/paired_comparison.json`` and drawn as ``figures/paired_comparison``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from analysis.api import section_bins
from featcache.errors import FeatcacheError
from featcache.stores import RunDir, Workspace

BLOCK_BINS = 64
MIN_BOOT = 100


def _stats(pred: np.ndarray, truth: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Per block and gene: n, Σp, Σt, Σp², Σt², Σpt — shape (blocks, 6, genes)."""
    n_blocks, g = blocks.max() + 1, pred.shape[1]
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
    ds = RunDir(ws.root / run_dir).open_predictions()
    keys, preds, truths = [], [], []
    for s, coords, p, t, _ in section_bins(ds):
        keys.append(np.column_stack([np.full(len(coords), s, dtype=object), coords]))
        preds.append(p)
        truths.append(t)
    return np.concatenate(keys), np.concatenate(preds), np.concatenate(truths), [str(g) for g in ds["gene"].values]


def paired_comparison(
    dataset: str, runs: list[str] | None = None, workspace=None, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Compare every pair of the given runs (default: every run of the comparison file); write and return it.

    ``n_boot``: bootstrap resamples of spatial blocks (at least MIN_BOOT: fewer make the 95 % interval's ends noise).
    """
    if n_boot < MIN_BOOT:
        raise FeatcacheError(f"--bootstrap {n_boot}: use at least {MIN_BOOT} resamples.")
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
    tables = {r: {f: _fold_table(ws, v["run_dir"]) for f, v in comparison[r]["fold_results"].items()} for r in runs}
    rng = np.random.default_rng(seed)
    pairs = [_pair(a, b, tables[a], tables[b], n_boot, rng) for a, b in combinations(runs, 2)]
    out = {
        "dataset": dataset,
        "method": {
            "difference": "B − A of pcc_gene (Pearson per gene over the test patient's scored bins, mean over "
            "genes), per fold, then the mean over folds",
            "test": "Wilcoxon signed-rank over genes of the fold-mean per-gene differences",
            "interval": f"95 % bootstrap ({n_boot} resamples, seed {seed}) resampling {BLOCK_BINS}×{BLOCK_BINS}-bin "
            "blocks of each test patient",
            "bins": "each scored bin once (overlapping patches averaged)",
        },
        "pairs": pairs,
    }
    out["_path"] = str(results.write_paired(out))
    return out


def _pair(a: str, b: str, ta: dict, tb: dict, n_boot: int, rng) -> dict:
    folds = sorted(set(ta) & set(tb))
    if not folds:
        raise FeatcacheError(f"runs {a} and {b} share no fold; compare runs of the same patients.")
    observed, boots, per_gene = {}, [], []
    for f in folds:
        keys, pa, truth, genes = ta[f]
        keys_b, pb, truth_b, genes_b = tb[f]
        if genes != genes_b or len(keys) != len(keys_b) or not np.array_equal(keys, keys_b):
            raise FeatcacheError(
                f"runs {a} and {b} scored different bins or genes in fold {f}; compare runs of the "
                "same dataset and scoring (--score)."
            )
        if not np.allclose(truth, truth_b, atol=1e-5):
            raise FeatcacheError(
                f"runs {a} and {b} have different targets in fold {f} (another --target?); their "
                "correlations are not comparable."
            )
        block_key = [f"{s}:{int(r) // BLOCK_BINS}:{int(c) // BLOCK_BINS}" for s, r, c in keys]
        blocks = np.unique(block_key, return_inverse=True)[1].ravel()
        sa, sb = _stats(pa, truth, blocks), _stats(pb, truth, blocks)
        ra, rb = _pearson(sa.sum(0)), _pearson(sb.sum(0))
        per_gene.append(rb - ra)
        observed[f] = float(np.nanmean(rb) - np.nanmean(ra))
        w = rng.multinomial(len(sa), np.full(len(sa), 1 / len(sa)), size=n_boot).astype(np.float64)  # (boot, blocks)
        boot_a, boot_b = _pearson(np.einsum("kb,bsg->ksg", w, sa)), _pearson(np.einsum("kb,bsg->ksg", w, sb))
        boots.append(np.nanmean(boot_b, axis=1) - np.nanmean(boot_a, axis=1))
    gene_diff = np.nanmean(np.stack(per_gene), axis=0)
    ok = np.isfinite(gene_diff)
    test = wilcoxon(gene_diff[ok]) if ok.sum() > 1 and np.any(gene_diff[ok] != 0) else None
    mean_boot = np.mean(np.stack(boots), axis=0)
    return {
        "a": a,
        "b": b,
        "mean_pcc_gene_difference": float(np.mean(list(observed.values()))),
        "ci95": [float(np.percentile(mean_boot, 2.5)), float(np.percentile(mean_boot, 97.5))],
        "per_fold": observed,
        "folds": folds,
        "n_genes": int(ok.sum()),
        "genes_favouring_b": int((gene_diff[ok] > 0).sum()),
        "wilcoxon": {"statistic": float(test.statistic), "p_value": float(test.pvalue)} if test else None,
        "per_gene_difference": {g: (float(v) if np.isfinite(v) else None) for g, v in zip(genes, gene_diff)},
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
            colour = "#0072B2" if (lo[k] > 0 or hi[k] < 0) else "#999999"
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
        labels = []
        for p in pairs:
            w = p["wilcoxon"]
            labels.append(f"{p['b']} − {p['a']}" + (f"  (Wilcoxon p={w['p_value']:.2g})" if w else ""))
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("difference in pcc_gene (mean over folds), 95 % block-bootstrap interval")
        ax.set_title("Paired comparison of runs (blue: interval excludes 0)")
        return _save(fig, out, "paired_comparison")
