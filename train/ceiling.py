"""The noise ceiling of a synthetic sample: the best score any predictor could reach on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.geometry import gather_windows
from train.data import FoldInputs, TargetTransform
from train.metrics import evaluate


def truth_file(inputs: FoldInputs, sample: str) -> Path:
    """``synthetic_truth.h5`` beside a sample made by ``featcache synth`` (absent for real data)."""
    src = Path(inputs.meta["samples"][sample]["source"])  # .../<sample>/outs/binned_outputs/square_008um
    return src.parents[2] / "synthetic_truth.h5"


def noise_ceiling(inputs: FoldInputs, samples: list[str], transform: TargetTransform, truth, mask) -> dict | None:
    """Best achievable scores on synthetic samples: the true rates scored like a prediction (None for real data)."""
    parts = [ceiling_prediction(inputs, s, transform) for s in samples]
    if any(p is None for p in parts):
        return None
    ceiling = evaluate(np.concatenate(parts), truth, mask, np.zeros(len(inputs.genes)), inputs.genes)
    ceiling.pop("per_gene")
    return ceiling


def ceiling_prediction(inputs: FoldInputs, sample: str, transform: TargetTransform) -> np.ndarray | None:
    """The true rates of one synthetic sample, transformed like the targets: (patch, gene, row, col)."""
    import h5py

    path = truth_file(inputs, sample)
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        barcodes = [b.decode() for b in f["barcodes"][()]]
        gene_ids = [g.decode() for g in f["gene_ids"][()]]
        rates = f["rates"][()]
    rr = np.array([int(b[8:13]) for b in barcodes])  # s_008um_RRRRR_CCCCC-1
    cc = np.array([int(b[14:19]) for b in barcodes])
    origins = inputs.arrays[sample].origin.astype(int)
    grid = np.full((max(rr.max(), origins[:, 0].max() + 32) + 1, max(cc.max(), origins[:, 1].max() + 32) + 1), -1)
    grid[rr, cc] = np.arange(len(barcodes))
    row = gather_windows(grid, origins)  # (n, 32, 32) index into rates, -1 where no in-tissue bin
    has = row >= 0
    cols = [gene_ids.index(g) for g in inputs.meta["genes"]["ids"]]
    safe = np.where(has, row, 0)
    panel = np.where(has[..., None], rates[safe][..., cols], 0.0).transpose(0, 3, 1, 2)
    lib = np.where(has, rates.sum(axis=1)[safe], 0.0)
    return transform(panel, lib)
