"""Metrics on the test patient, in target space (docs/design.md §6).

All functions take ``pred`` and ``truth`` of shape (patch, gene, row, col) and a boolean ``mask``
(patch, row, col) of the bins that are scored (in-tissue bins by default; every bin in the
reproduction mode).

* ``pcc_gene`` (primary): Pearson per gene across all scored bins, then the mean over genes.
  Genes constant in the truth have no correlation and are left out (and listed); a gene the
  model predicts as a constant scores 0 (as Img2ST-Net does), so collapsing a gene never helps.
* ``pcc_global``: one Pearson over all flattened values (the reference study's ``pearson_r``).
* ``spearman_gene``: as pcc_gene on ranks (average ranks for ties); ``spearman_global``: one
  Spearman over all flattened values (the reference study's ``spearman_rho``).
* ``mse``: mean squared error over scored bins and genes.
* ``ssim_st``: 2-D SSIM of each gene's 32 × 32 map per patch (7 × 7 uniform window, K1 0.01,
  K2 0.03, sample covariance, borders cropped, as scikit-image computes it), with data range = the
  gene's truth range over the test patient and unscored bins set to the gene's training mean in
  both maps; only the windows centred on a scored bin are averaged (over patches, then genes), so
  glass, identical in both maps, earns nothing. (The reference code's "ssim_st" was a clipped
  correlation, not SSIM.)

A prediction that is not finite on a scored bin stops evaluation (:func:`check_finite`): a NaN
would otherwise score its gene 0 and make ``mse`` NaN without a word.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from featcache.errors import FeatcacheError


def _flat(pred, truth, mask):
    m = mask.astype(bool)
    p = np.moveaxis(pred, 1, -1)[m].astype(np.float64)  # (bins, genes)
    t = np.moveaxis(truth, 1, -1)[m].astype(np.float64)
    return p, t


def columnwise_pearson(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair; NaN where the truth is constant, 0 where only the prediction is."""
    pc = p - p.mean(axis=0)
    tc = t - t.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(axis=0) / np.sqrt((pc**2).sum(axis=0) * (tc**2).sum(axis=0))
    varies = lambda a: _varies(a) if len(a) else np.zeros(a.shape[1], bool)  # noqa: E731
    return np.where(varies(t), np.where(varies(p), r, 0.0), np.nan)


def _varies(a: np.ndarray) -> np.ndarray:
    """Does each column vary beyond rounding? A constant that went through arithmetic (the 16/32 µm back-transform
    of a training-mean prediction, a count loss's rates) differs from itself by ~1e-7 of its size in float32, or by
    ~1e-16 around 0 once z-scored, and must still score 0, not the correlation of its rounding errors."""
    return np.ptp(a, axis=0) > np.maximum(1e-6 * np.abs(a).max(axis=0), 1e-9)


def per_gene_pearson(pred, truth, mask) -> np.ndarray:
    return columnwise_pearson(*_flat(pred, truth, mask))


def per_gene_spearman(pred, truth, mask) -> np.ndarray:
    p, t = _flat(pred, truth, mask)
    return columnwise_pearson(rankdata(p, axis=0), rankdata(t, axis=0))


def pearson_global(pred, truth, mask) -> float:
    p, t = _flat(pred, truth, mask)
    return float(columnwise_pearson(p.reshape(-1, 1), t.reshape(-1, 1))[0])


def spearman_global(pred, truth, mask) -> float:
    p, t = _flat(pred, truth, mask)
    return float(columnwise_pearson(rankdata(p.ravel())[:, None], rankdata(t.ravel())[:, None])[0])


def mse(pred, truth, mask) -> float:
    p, t = _flat(pred, truth, mask)
    return float(np.mean((p - t) ** 2))


def check_finite(pred, mask, gene_names, run: str = "the prediction") -> None:
    """Refuse a prediction with NaN or infinite values on scored bins, naming the run, the gene and the bin count."""
    bad = ~np.isfinite(np.moveaxis(pred, 1, -1)[mask.astype(bool)])  # (bins, genes)
    if bad.any():
        counts = bad.sum(axis=0)
        worst = [f"{g} ({int(n)} bins)" for g, n in zip(gene_names, counts) if n]
        raise FeatcacheError(
            f"{run}: the prediction is not finite (NaN or inf) on {int(bad.any(axis=1).sum())} of {len(bad)} scored "
            f"bins, genes {', '.join(worst[:5])}{' …' if len(worst) > 5 else ''}; the training diverged or its "
            "inputs hold non-finite values: retrain with a lower --lr, or check the feature store with "
            "`featcache verify`."
        )


def ssim_maps(
    x: np.ndarray,
    y: np.ndarray,
    data_range: np.ndarray,
    win: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    centres: np.ndarray | None = None,
) -> np.ndarray:
    """Mean SSIM of each 2-D map pair; x, y (..., H, W), data_range broadcastable to (...).

    ``centres`` (boolean, broadcastable to x): average only the windows centred there; NaN where none is.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    size = (1,) * (x.ndim - 2) + (win, win)
    n = win * win
    cov = n / (n - 1)  # sample covariance, as skimage's default
    ux, uy = ndimage.uniform_filter(x, size), ndimage.uniform_filter(y, size)
    uxx, uyy, uxy = (ndimage.uniform_filter(a, size) for a in (x * x, y * y, x * y))
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    dr = np.asarray(data_range, dtype=np.float64)[..., None, None]
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    s = s[..., pad:-pad, pad:-pad]
    if centres is None:
        return s.mean(axis=(-2, -1))
    w = np.broadcast_to(centres, x.shape)[..., pad:-pad, pad:-pad]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w, s, 0.0).sum(axis=(-2, -1)) / w.sum(axis=(-2, -1))


def ssim_st(pred, truth, mask, train_mean: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean SSIM over patches and genes, and per gene (NaN for genes constant in truth).

    Per patch the windows centred on a scored bin are averaged; a patch with none (all its scored
    bins within 3 bins of its edge) is left out; per gene the patches' means are averaged.
    """
    m = mask.astype(bool)[:, None]
    fill = np.asarray(train_mean, dtype=np.float64)[None, :, None, None]
    p = np.where(m, pred, fill)
    t = np.where(m, truth, fill)
    _, tf = _flat(pred, truth, mask)
    rng = tf.max(axis=0) - tf.min(axis=0) if len(tf) else np.zeros(truth.shape[1])
    per_patch = ssim_maps(p, t, np.broadcast_to(np.where(rng > 0, rng, 1.0), p.shape[:2]), centres=m)
    with np.errstate(invalid="ignore"):
        per_gene = np.nanmean(per_patch, axis=0) if np.isfinite(per_patch).any() else np.full(p.shape[1], np.nan)
    per_gene[~(rng > 0)] = np.nan
    return float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() else float("nan"), per_gene


def evaluate(pred, truth, mask, train_mean, gene_names, ssim_mask=None, run: str = "the prediction") -> dict:
    """Every metric, per-gene values, and the genes left out (constant truth) or scored 0 (constant prediction).

    ``ssim_mask`` (default ``mask``): the bins SSIM's maps keep, when the point metrics count fewer
    (overlapping patches, each bin counted once). ``run`` names the prediction in the message that
    refuses a non-finite one.
    """
    check_finite(pred, mask if ssim_mask is None else ssim_mask, gene_names, run)
    r = per_gene_pearson(pred, truth, mask)
    rho = per_gene_spearman(pred, truth, mask)
    ssim, ssim_g = ssim_st(pred, truth, mask if ssim_mask is None else ssim_mask, train_mean)
    p, t = _flat(pred, truth, mask)
    constant_truth = [g for g, v in zip(gene_names, r) if not np.isfinite(v)]
    flat = np.ptp(p, axis=0) == 0 if len(p) else np.ones(len(gene_names), bool)
    constant_pred = [g for g, c, v in zip(gene_names, flat, r) if c and np.isfinite(v)]
    nanmean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    return {
        "pcc_gene": nanmean(r),
        "pcc_global": pearson_global(pred, truth, mask),
        "spearman_gene": nanmean(rho),
        "spearman_global": spearman_global(pred, truth, mask),
        "mse": mse(pred, truth, mask),
        "ssim_st": ssim,
        "n_bins": int(mask.sum()),
        "n_patches": int(len(mask)),
        "n_genes_scored": int(np.isfinite(r).sum()),
        "genes_constant_in_truth": constant_truth,
        "genes_constant_prediction": constant_pred,
        "per_gene": {
            g: {"pcc": _num(a), "spearman": _num(b), "ssim": _num(c)} for g, a, b, c in zip(gene_names, r, rho, ssim_g)
        },
    }


def _num(v) -> float | None:
    return float(v) if np.isfinite(v) else None
