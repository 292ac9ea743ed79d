"""The noise ceiling of a synthetic sample: the best score any predictor of the targets can reach.

``featcache synth`` draws counts as ``Poisson(rate × Gamma(k, 1/k))`` (negative binomial of size
k, recorded in ``synthetic_truth.h5``) and the target is a function of those counts and of the
bin's library (the sum over all genes), e.g. ``log1p(1e4 · c / L)``. Given the true rates, the
best predictor of the target is therefore ``E[target | rates]`` — not the target transform of
the rates — which is estimated here by Monte Carlo over the full generating model, every gene
drawn (the library sums them), then scaled like the fold's targets and scored like a prediction.
No function of the image can beat it in expectation (the image carries no information about the
counts beyond the rates), which a test checks with an oracle built from the true compartments.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from featcache.geometry import GEOMETRY, gather_windows
from train.data import FoldInputs, TargetTransform, target_values
from train.metrics import evaluate

DRAWS = 64  # Monte Carlo draws per bin
BLOCK = 512  # bins per block of draws


def truth_file(inputs: FoldInputs, sample: str) -> Path:
    """``synthetic_truth.h5`` beside a sample made by ``featcache synth`` (absent for real data)."""
    src = Path(inputs.meta["samples"][sample]["source"])  # .../<sample>/outs/binned_outputs/square_008um
    return src.parents[2] / "synthetic_truth.h5"


def noise_ceiling(inputs: FoldInputs, test, transform: TargetTransform, points, maps) -> dict | None:
    """Scores of E[target | true rates] on the test patches (None unless every test section is synthetic)."""
    parts = []
    for s in np.unique(test.samples):
        k = np.flatnonzero(test.samples == s)
        path = truth_file(inputs, str(s))
        if not path.is_file():
            return None
        expected = expected_values(str(path), transform.kind, test.origins[k], tuple(inputs.meta["genes"]["ids"]))
        if expected is None:
            return None
        parts.append((k, transform.scale(expected)))
    pred = np.empty_like(test.truth)
    for k, values in parts:
        pred[k] = values
    ceiling = evaluate(pred, test.truth, points, transform.target_mean, inputs.genes, ssim_mask=maps)
    ceiling.pop("per_gene")
    ceiling["method"] = f"E[target | true rates] by Monte Carlo ({DRAWS} draws per bin, every gene drawn)"
    return ceiling


def expected_values(path: str, kind: str, origins: np.ndarray, panel: tuple[str, ...], draws: int = DRAWS):
    """E[target values | rates] of every bin of the given patches: (patch, gene, row, col), unscaled."""
    origins = np.asarray(origins, dtype=np.int64)
    return _expected(path, kind, panel, draws, origins.tobytes(), len(origins))


@lru_cache(maxsize=16)
def _expected(path: str, kind: str, panel: tuple[str, ...], draws: int, origin_bytes: bytes, n: int):
    import h5py

    with h5py.File(path, "r") as f:
        if "nb_size" not in f.attrs or "rates" not in f:
            return None  # a truth file from before the noise model was recorded
        k = float(f.attrs["nb_size"])
        barcodes = [b.decode() for b in f["barcodes"][()]]
        gene_ids = [g.decode() for g in f["gene_ids"][()]]
        rates = f["rates"][()].astype(np.float64)
    origins = np.frombuffer(origin_bytes, dtype=np.int64).reshape(n, 2)
    rr = np.array([int(b[8:13]) for b in barcodes])  # s_008um_RRRRR_CCCCC-1
    cc = np.array([int(b[14:19]) for b in barcodes])
    b = GEOMETRY.bins
    shape = (max(rr.max() + 1, int(origins[:, 0].max()) + b), max(cc.max() + 1, int(origins[:, 1].max()) + b))
    grid = np.full(shape, -1, np.int64)
    grid[rr, cc] = np.arange(len(barcodes))
    idx = gather_windows(grid, origins)  # (n, 32, 32) row of ``rates``; -1: a bin without counts
    needed = np.unique(idx[idx >= 0])
    cols = np.array([gene_ids.index(g) for g in panel])
    rng = np.random.default_rng([zlib.crc32(path.encode()), draws])
    expected = np.empty((len(needed), len(panel)))
    for a in range(0, len(needed), BLOCK):
        r = rates[needed[a : a + BLOCK]]
        counts = rng.poisson(r[None] * rng.gamma(k, 1 / k, (draws, *r.shape)))
        expected[a : a + BLOCK] = target_values(kind, counts[..., cols], counts.sum(axis=2)).mean(axis=0)
    zero = target_values(kind, np.zeros((1, len(panel))), np.zeros(1))[0]  # a bin without counts
    if len(needed) == 0:
        return np.broadcast_to(zero[None, :, None, None], (n, len(panel), b, b)).copy()
    out = np.where((idx >= 0)[..., None], expected[np.searchsorted(needed, np.maximum(idx, 0))], zero)
    return out.transpose(0, 3, 1, 2)
