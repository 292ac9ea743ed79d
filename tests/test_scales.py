"""The 16 / 32 µm scores on the section's own block grid (train/scales.py, docs/design.md §6), whatever the stride."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import TargetTransform
from train.metrics import columnwise_pearson
from train.scales import scale_scores


def _section(seed=0, side=72, genes=3):
    rng = np.random.default_rng(seed)
    library = rng.gamma(3.0, 200.0, (side, side))
    counts = rng.poisson(library[None] * rng.uniform(1e-3, 1e-2, (genes, 1, 1))).astype(np.int64)
    pred = rng.normal(size=(genes, side, side))  # one prediction per bin: the same in every patch holding it
    mask = rng.random((side, side)) > 0.1
    return counts, library, pred, mask


def _blocks(a, k):
    n = a.shape[-1] // k
    return a.reshape(*a.shape[:-2], n, k, n, k).sum(axis=(-3, -1))


def _patches(grid, origins, b=32):
    return np.stack([grid[..., r : r + b, c : c + b] for r, c in origins])


@pytest.mark.parametrize("stride", [32, 16, 10, 20])
@pytest.mark.parametrize("target", ["log1p-cp10k", "log1p-counts"])
def test_each_block_of_the_section_is_scored_once_whatever_the_stride(stride, target):
    counts, library, pred, mask = _section()
    side = mask.shape[0]
    starts = np.arange(0, side - 32 + 1, stride)
    origins = np.array([(r, c) for r in starts for c in starts])
    covered = np.zeros_like(mask)
    for r, c in origins:
        covered[r : r + 32, c : c + 32] = True
    scored = mask & covered
    transform = (
        TargetTransform("log1p-cp10k", [0.5, 1.0, 1.5], [0.7, 0.9, 1.1])
        if target == "log1p-cp10k"
        else (TargetTransform("log1p-counts", 0.0, 1.0))
    )
    out = scale_scores(
        _patches(pred, origins),
        _patches(counts, origins),
        _patches(library, origins),
        _patches(mask, origins),
        origins,
        np.array(["S"] * len(origins)),
        transform,
    )
    for name, k in (("pcc_gene_16um", 2), ("pcc_gene_32um", 4)):
        # directly on the section: blocks with corners at multiples of k, each holding a scored bin
        blk = lambda a, k=k: _blocks(a, k)  # noqa: E731
        keep = blk(scored.astype(int)) > 0
        c, lib, nb = blk(counts * scored), blk(library * scored), blk(scored.astype(float))
        log_pred = pred * transform.std[:, None, None] + transform.mean[:, None, None] if transform.zscored else pred
        expr = np.maximum(np.expm1(log_pred), 0) * scored
        if target == "log1p-counts":
            t, p = np.log1p(c), np.log1p(blk(expr))
        else:
            t = np.log1p(c * 1e4 / np.maximum(lib, 1))
            p = np.log1p(blk(expr) / np.maximum(nb, 1))
            t, p = ((v - transform.mean[:, None, None]) / transform.std[:, None, None] for v in (t, p))
        want = np.nanmean(columnwise_pearson(np.moveaxis(p, 0, -1)[keep], np.moveaxis(t, 0, -1)[keep]))
        assert out[f"n_blocks_{name.rsplit('_', 1)[1]}"] == int(keep.sum())
        assert out[name] == pytest.approx(want, abs=1e-9), (name, stride)
