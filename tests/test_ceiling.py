"""The noise ceiling is an upper bound: no predictor built from what the image shows beats it."""

from __future__ import annotations

import h5py
import numpy as np

from featcache.geometry import gather_windows
from featcache.stores import Workspace
from train.ceiling import expected_values, truth_file
from train.data import FoldInputs, TargetTransform, load_targets
from train.metrics import per_gene_pearson


def test_image_only_oracle_never_beats_the_ceiling(prepared):
    ws, _ = prepared
    inputs = FoldInputs(Workspace(ws).open_dataset("tiny"), None)
    train, test = inputs.arrays["P1"], inputs.arrays["P2"]
    transform = TargetTransform.fit([load_targets(train, np.arange(len(train.origin)))])
    counts, library, mask = load_targets(test, np.arange(len(test.origin)))
    truth = transform(counts, library)

    path = truth_file(inputs, "P2")
    panel = tuple(inputs.meta["genes"]["ids"])
    ceiling = transform.scale(expected_values(str(path), transform.kind, test.origin, panel, draws=128))
    ceiling_r = per_gene_pearson(ceiling, truth, mask)

    # The oracle sees the true compartment fractions of every bin (all the image can show) and is fitted by
    # least squares on the test bins themselves.
    with h5py.File(path) as f:
        fractions = f["compartment_fractions"][()]
        barcodes = [b.decode() for b in f["barcodes"][()]]
        gene_ids = [g.decode() for g in f["gene_ids"][()]]
        rates = f["rates"][()]
    rr = np.array([int(b[8:13]) for b in barcodes])
    cc = np.array([int(b[14:19]) for b in barcodes])
    grid = np.full((rr.max() + 33, cc.max() + 33), -1)
    grid[rr, cc] = np.arange(len(barcodes))
    idx = gather_windows(grid, test.origin.astype(int))
    m = mask & (idx >= 0)
    design = np.column_stack([fractions[idx[m]], np.ones(m.sum())])
    y = np.moveaxis(truth, 1, -1)[m]
    fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    oracle = np.zeros_like(truth)
    view = np.moveaxis(oracle, 1, -1)
    view[m] = fitted
    oracle_r = per_gene_pearson(oracle, truth, m)

    # The old "ceiling": the transform of the true rates themselves.
    cols = [gene_ids.index(g) for g in panel]
    safe = np.maximum(idx, 0)
    rate_panel = np.where((idx >= 0)[..., None], rates[safe][..., cols], 0).transpose(0, 3, 1, 2)
    rate_total = np.where(idx >= 0, rates.sum(axis=1)[safe], 0)
    old_r = per_gene_pearson(transform(rate_panel, rate_total), truth, m)

    ok = np.isfinite(ceiling_r) & np.isfinite(oracle_r)
    print(
        f"pcc_gene: ceiling {np.mean(ceiling_r[ok]):.3f}, oracle {np.mean(oracle_r[ok]):.3f}, "
        f"transformed rates {np.nanmean(old_r):.3f}"
    )
    assert np.mean(oracle_r[ok]) < np.mean(ceiling_r[ok])
    assert np.all(oracle_r[ok] <= ceiling_r[ok] + 0.02)  # per gene, within Monte Carlo error
    assert np.nanmean(old_r) < np.mean(ceiling_r[ok])  # the old value understated the bound
