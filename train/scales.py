"""Scores at other scales than the 8 µm bin (docs/design.md §6): HEST's patch level and 16 / 32 µm bins.

Every head (unet, linear, ridge) reports them beside the 8 µm metrics, from the same test predictions:

* ``pcc_gene_patch`` (HEST-Benchmark's metric): each test patch's mean over its scored bins of the
  prediction and of the truth (target space); Pearson per gene across the test patches, mean over genes.
  Genes constant in the truth are left out, a constant prediction scores 0, as for ``pcc_gene``. Every
  patch is its own unit (overlapping patches each count, as HEST's spots do).
* ``pcc_gene_16um``, ``pcc_gene_32um``: ``pcc_gene`` over blocks of 2 × 2 and 4 × 4 bins of each
  patch. The truth is the block's raw counts summed over its scored bins (and their library sizes
  summed), then the run's own target transform (CP10k, log1p, the z-score with the training
  patients' 8 µm statistics: a per-gene affine map, so it changes no Pearson r). The prediction:
  each bin's prediction is taken back to expression (``expm1`` of the un-z-scored value, clipped to
  [0, e^80]: CP10k for ``log1p-cp10k``, counts for ``log1p-counts``), aggregated over the block's scored
  bins as the truth aggregates them (counts: summed; CP10k: averaged, the unweighted mean because
  the prediction may not use the measured library sizes), then transformed again. The blocks lie on
  the section's own grid (corners at array rows and columns that are multiples of k), after the
  patches are stitched: a bin's prediction is its mean over the patches holding it (as the 8 µm
  metrics do), so each block counts once whatever the stride, and a block counts when it holds a
  scored bin.

Everything here is computed from what ``predictions.zarr`` stores (raw per-patch predictions, mask,
origins, samples) and the dataset's counts and library sizes, so a reader can recompute it.
"""

from __future__ import annotations

import numpy as np

from featcache.geometry import BinSums
from train.metrics import columnwise_pearson

FACTORS = {"pcc_gene_16um": 2, "pcc_gene_32um": 4}  # bins per block side (8 µm bins)
PATCH_UM = 256  # a patch is 32 × 32 bins of 8 µm: the scale of pcc_gene_patch
CHUNK = 256  # patches per step of the patch means
GENE_CHUNK = 16  # genes per step of the coarse scores (each a section-sized float64 grid)
MAX_LOG = 80.0  # predictions are taken back to expression with expm1 of at most this (finite sums in float64)


def _nanmean(v) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def patch_means(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(patch, gene) means over each patch's scored bins; NaN rows for patches with none."""
    m = mask.astype(np.float64)[:, None]
    n = m.sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values.astype(np.float64) * m).sum(axis=(2, 3)) / n


def _blocks(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over k × k blocks of the last two axes."""
    *lead, r, c = a.shape
    return a.reshape(*lead, r // k, k, c // k, k).sum(axis=(-3, -1))


def _scaled(transform, log: np.ndarray) -> np.ndarray:
    """The run's z-score (or none) in float64: a prediction that varies little across blocks keeps its digits."""
    if not transform.zscored:
        return log
    return (log - transform.mean[None, :, None, None]) / transform.std[None, :, None, None]


def coarse_truth(counts: np.ndarray, library: np.ndarray, mask: np.ndarray, transform, k: int) -> np.ndarray:
    """Target-space truth of k × k blocks: counts and library sizes summed over the block's scored bins, then the
    run's transform (train.data.target_values' formula, in float64)."""
    m = mask.astype(np.int64)
    c = _blocks(counts.astype(np.int64) * m[:, None], k).astype(np.float64)
    lib = _blocks(np.asarray(library, dtype=np.float64) * m, k)
    log = np.log1p(c) if transform.kind == "log1p-counts" else np.log1p(c * (1e4 / np.maximum(lib, 1.0))[:, None])
    return _scaled(transform, log)


def coarse_prediction(pred: np.ndarray, mask: np.ndarray, transform, k: int) -> np.ndarray:
    """Target-space prediction of k × k blocks: per-bin expression (CP10k or counts) aggregated as the truth is."""
    z = pred.astype(np.float64)
    log = z * transform.std[None, :, None, None] + transform.mean[None, :, None, None] if transform.zscored else z
    # clipped to [0, e^80]: a wild prediction (a ridge head extrapolating far) stays finite, and unscored bins are 0
    expr = np.where(mask[:, None], np.maximum(np.expm1(np.minimum(log, MAX_LOG)), 0.0), 0.0)
    total = _blocks(expr, k)
    if transform.kind == "log1p-counts":
        value = np.log1p(total)
    else:  # CP10k: the block's mean over its scored bins
        n = _blocks(mask.astype(np.float64), k)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.log1p(np.where(n > 0, total / np.maximum(n, 1), 0.0))
    return _scaled(transform, value)


def _section_blocks(pred, counts, library, mask, origins, k: int, transform) -> tuple[np.ndarray, np.ndarray]:
    """One section's k × k blocks on the section's own grid (block corners at array rows and columns that are
    multiples of k), every block holding a scored bin once: (blocks, gene) predictions and truth.

    The patches are stitched first (:class:`~featcache.geometry.BinSums`: a bin's prediction is its mean over the
    patches holding it, its counts and library are the dataset's), so overlapping patches, strides that are not a
    multiple of k and gaps between patches all give the same blocks as the section itself."""
    sums = BinSums(origins, mask.astype(np.float64)[:, None])
    pad = [(int(t % k), 0) for t in sums.top_left]  # align the stitched grid's corner on the section's k-grid
    rows, cols = (-(-(p + n) // k) * k for (p, _), n in zip(pad, sums.count.shape))

    def stitched(values: np.ndarray) -> np.ndarray:
        """(1, channel, rows, cols): per-patch maps averaged bin by bin, on the k-aligned section grid."""
        grid = np.pad(np.nan_to_num(BinSums(origins, np.asarray(values, np.float64)).grid()), [(0, 0), *pad])
        return np.pad(grid, [(0, 0), (0, rows - grid.shape[1]), (0, cols - grid.shape[2])])[None]

    scored = stitched(mask[:, None])[:, 0] > 0  # (1, rows, cols): scored by a patch holding the bin
    lib = stitched(library[:, None])[:, 0]
    blocks = _blocks(scored.astype(np.int64), k)[0] > 0
    guess, truth = [], []
    for g0 in range(0, pred.shape[1], GENE_CHUNK):  # a few genes at a time: section-sized float64 grids
        g = slice(g0, g0 + GENE_CHUNK)
        p = stitched(pred[:, g])
        c = np.rint(stitched(counts[:, g])).astype(np.int64)
        sub = _gene_subset(transform, g)
        guess.append(np.moveaxis(coarse_prediction(p, scored, sub, k)[0], 0, -1)[blocks])
        truth.append(np.moveaxis(coarse_truth(c, lib, scored, sub, k)[0], 0, -1)[blocks])
    return np.concatenate(guess, axis=1), np.concatenate(truth, axis=1)


def _gene_subset(transform, genes: slice):
    """The transform restricted to a slice of genes (its per-gene statistics sliced)."""
    if not transform.zscored:
        return transform
    return type(transform)(transform.kind, transform.mean[genes], transform.std[genes])


def scale_scores(pred, counts, library, mask, origins, samples, transform) -> dict:
    """pcc_gene_patch, pcc_gene_16um and pcc_gene_32um of one test patient.

    ``pred`` (patch, gene, row, col) as stored (each patch's own prediction, target space); ``counts``,
    ``library`` the dataset's raw targets of the same patches; ``mask`` the scored bins (in-tissue, or every
    bin with ``--score all-bins``); ``transform`` the run's :class:`~train.data.TargetTransform`.
    """
    mask = np.asarray(mask, bool)
    samples = np.asarray(samples).astype(str)
    origins = np.asarray(origins)
    means = [  # in chunks of patches: the float64 bin-level intermediates stay small
        (patch_means(pred[b], mask[b]), patch_means(transform(counts[b], library[b]), mask[b]))
        for b in (slice(a, a + CHUNK) for a in range(0, len(mask), CHUNK))
    ]
    p, t = (np.concatenate([m[i] for m in means]) if means else np.zeros((0, pred.shape[1])) for i in range(2))
    keep = mask.reshape(len(mask), -1).any(axis=1)
    out = {
        "pcc_gene_patch": _nanmean(columnwise_pearson(p[keep], t[keep])),
        "n_patches_scored": int(keep.sum()),
    }
    for name, k in FACTORS.items():
        parts = [
            _section_blocks(pred[i], counts[i], library[i], mask[i], origins[i], k, transform)
            for i in (np.flatnonzero(samples == s) for s in dict.fromkeys(samples.tolist()))
        ]
        guess, truth = (np.concatenate([q[i] for q in parts]) for i in range(2))
        out[name] = _nanmean(columnwise_pearson(guess, truth))
        out[f"n_blocks_{name.rsplit('_', 1)[1]}"] = len(guess)
    return out


def test_scale_scores(inputs, test, transform, all_bins: bool, pred=None) -> dict:
    """:func:`scale_scores` of a fold's :class:`~train.run.TestSet`, its counts read from the dataset (test order);
    ``pred`` scores another prediction of the same patches (the floor's) instead of the run's."""
    from train.data import load_targets

    sections = dict.fromkeys(str(s) for s in test.samples)  # in the test set's order
    parts = [load_targets(inputs.arrays[s], np.arange(len(inputs.arrays[s].origin))) for s in sections]
    counts, library = (np.concatenate([p[i] for p in parts]) for i in range(2))
    mask = np.ones(test.mask.shape, bool) if all_bins else test.mask
    pred = test.pred if pred is None else pred
    return scale_scores(pred, counts, library, mask, test.origins, test.samples, transform)
