"""The noise ceiling of a synthetic sample: the best score any predictor of the targets can reach.

``featcache synth`` draws counts as ``Poisson(rate × Gamma(k, 1/k))`` (negative binomial of size
k, recorded in ``synthetic_truth.h5``) and the target is a function of those counts and of the
bin's library (the sum over all genes), e.g. ``log1p(1e4 · c / L)``. Given the true rates, the
best predictor of the target is therefore ``E[target | rates]`` — not the target transform of
the rates — which is computed here from the full generating model, every gene in it (the library
sums them), then scaled like the fold's targets and scored like a prediction.
No function of the image can beat it in expectation (the image carries no information about the
counts beyond the rates), which a test checks gene by gene with an oracle built from the true
compartments.

E[target | rates] is computed half exactly: a panel gene's count c and the rest of its bin's library
R (every other gene's UMIs) are independent given the rates, so E[target(c, c + R)] is summed over
c's negative binomial distribution exactly (Rao–Blackwellised) and averaged over ``DRAWS`` Monte
Carlo draws of R only. The target depends on R weakly (R is hundreds of UMIs), so the Monte Carlo
noise left is small: a per-gene error of ≤ 0.004 and 0.0001 on pcc_gene on the test data, where 64
draws of every count left up to 0.03 per gene and an image-only oracle beat that ceiling on 1–3
genes of 50 (log1p-counts targets do not depend on R at all and are exact).

What noise is left still biases the plug-in Pearson r low (noise in Ê adds variance the truth does
not share), so ``pcc_gene`` is estimated without that bias: the draws come in ``GROUPS``
independent groups, ``cov(Ê, truth)`` is unbiased as it is, and the variance of E over the bins is
the mean covariance between *different* groups' estimates, which no Monte Carlo noise enters (the
attenuation correction). Its Monte Carlo error is the delete-one-group jackknife standard error,
reported as ``pcc_gene_mc_error`` (its largest per gene as ``pcc_gene_mc_error_per_gene_max``). The other metrics are the plug-in scores of Ê. The
draws are seeded from the dataset fingerprint and the sample, never from a path, so a moved
workspace gives the same ceiling.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from featcache.geometry import GEOMETRY, gather_windows
from featcache.spaceranger import parse_bin_barcode
from train.data import FoldInputs, TargetTransform, target_values
from train.metrics import _varies, evaluate

DRAWS = 16  # Monte Carlo draws of each bin's library (a gene's own count is summed over exactly)
GROUPS = 8  # independent groups of draws (the bias correction and the jackknife)
BLOCK_DRAWS = 1 << 22  # counts drawn at a time (32 MB of int64), whatever the number of genes
MAX_MC_ERROR = 0.002  # the Monte Carlo standard error on pcc_gene the ceiling is sized for


def truth_file(inputs: FoldInputs, sample: str) -> Path:
    """``synthetic_truth.h5`` beside a sample made by ``featcache synth`` (absent for real data)."""
    src = Path(inputs.meta["samples"][sample]["source"])  # .../<sample>/outs/binned_outputs/square_008um
    return src.parents[2] / "synthetic_truth.h5"


def noise_ceiling(inputs: FoldInputs, test, transform: TargetTransform, points, maps) -> dict | None:
    """Scores of E[target | true rates] on the test patches (None unless every test section is synthetic)."""
    pred = np.empty_like(test.truth)
    groups = []  # per section: its patches and their Monte Carlo draws
    for s in np.unique(test.samples):
        k = np.flatnonzero(test.samples == s)
        path = truth_file(inputs, str(s))
        if not path.is_file():
            return None
        panel = tuple(inputs.meta["genes"]["ids"])
        draws = expected_draws(str(path), transform.kind, test.origins[k], panel, seed_key(inputs, str(s)))
        if draws is None:
            return None
        pred[k] = transform.scale(draws.patch_maps())
        groups.append((k, draws))
    ceiling = evaluate(
        pred, test.truth, points, transform.target_mean, inputs.genes, ssim_mask=maps, run="noise ceiling"
    )
    ceiling.pop("per_gene")
    # the unbiased pcc_gene: flatten each group's estimate over the scored bins as the metrics flatten the truth
    order = np.concatenate([k for k, _ in groups])
    est = np.concatenate([d.scored(points[k]) for k, d in groups], axis=1)  # bins in section order
    sec_points = points[order]
    t = np.moveaxis(test.truth[order], 1, -1)[sec_points.astype(bool)].astype(np.float64)
    r, per_gene_error, error = corrected_pearson(est, t)
    ceiling.update(
        {
            "pcc_gene_plugin": ceiling["pcc_gene"],
            "pcc_gene": float(np.nanmean(r)) if np.isfinite(r).any() else None,
            "pcc_gene_mc_error": error,
            "pcc_gene_mc_error_per_gene_max": float(np.nanmax(per_gene_error)) if np.isfinite(r).any() else None,
            "per_gene_pcc": {g: (float(v) if np.isfinite(v) else None) for g, v in zip(inputs.genes, r)},
            "method": f"E[target | true rates]: each gene's own count summed over its negative binomial exactly, the "
            f"rest of the bin's library by Monte Carlo ({DRAWS} draws per bin in {GROUPS} groups); pcc_gene without "
            "the Monte Carlo noise's downward bias (attenuation-corrected with the covariance between groups), its "
            "Monte Carlo error the delete-one-group jackknife standard error; the other metrics are the plug-in "
            "scores",
            "draws_seed": "the dataset fingerprint and the sample",
        }
    )
    return ceiling


def corrected_pearson(est: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-gene Pearson r of E[target] with the truth from G noisy estimates of E, and its jackknife errors.

    est (G, bins, genes): independent Monte Carlo estimates; truth (bins, genes). Returns r per gene
    (NaN where the truth is constant), each gene's jackknife standard error, and that of the mean over genes.
    """
    g = len(est)
    full = _corrected(est, truth)
    leave = np.stack([_corrected(np.delete(est, j, axis=0), truth) for j in range(g)])  # (G, genes)
    ok = np.isfinite(full)
    spread = lambda v: np.sqrt((g - 1) / g * np.sum((v - v.mean(axis=0)) ** 2, axis=0))  # noqa: E731
    per_gene = np.where(ok, spread(np.where(ok, leave, 0.0)), np.nan)
    error = float(spread(leave[:, ok].mean(axis=1))) if ok.any() else None
    return full, per_gene, error


def _corrected(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    g = len(est)
    tc = truth - truth.mean(axis=0)
    ec = est - est.mean(axis=1, keepdims=True)
    mean = ec.mean(axis=0)
    n = len(truth)
    var_t = (tc * tc).sum(axis=0) / n
    cov = (mean * tc).sum(axis=0) / n
    # Σ_{g≠h} cov(Ê_g, Ê_h) / (G(G−1)) = (G² var(Ê) − Σ_g var(Ê_g)) / (G(G−1)): the variance of E over the bins
    var_e = (g * g * (mean * mean).sum(axis=0) / n - (ec * ec).sum(axis=(0, 1)) / n) / (g * (g - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(np.maximum(var_e, 0.0) * var_t)
    r = np.where(var_e > 1e-12 * np.maximum(var_t, 1e-300), r, 0.0)
    return np.where(_varies(truth), r, np.nan) if n else np.full(truth.shape[1], np.nan)


def seed_key(inputs: FoldInputs, sample: str) -> str:
    """What seeds a sample's draws: the dataset's fingerprint and the sample, never a path."""
    return f"{inputs.dataset.fingerprint}:{sample}"


class Draws:
    """Monte Carlo estimates of E[target values | rates] per bin: ``values`` (G, bins with counts, genes), the
    (patch, 32, 32) index of each patch bin into them (−1: a bin without counts, whose target is ``zero``)."""

    def __init__(self, values: np.ndarray, idx: np.ndarray, zero: np.ndarray):
        self.values, self.idx, self.zero = values, idx, zero

    def patch_maps(self) -> np.ndarray:
        """The mean estimate on every patch bin: (patch, gene, row, col), unscaled."""
        mean = self.values.mean(axis=0)
        if mean.shape[0] == 0:
            return np.broadcast_to(
                self.zero[None, :, None, None], (*self.idx.shape[:1], len(self.zero), *self.idx.shape[1:])
            ).copy()
        out = np.where((self.idx >= 0)[..., None], mean[np.maximum(self.idx, 0)], self.zero)
        return out.transpose(0, 3, 1, 2)

    def scored(self, mask: np.ndarray) -> np.ndarray:
        """Each group's estimate on the masked patch bins, in the order the metrics flatten them: (G, bins, genes)."""
        i = self.idx[mask.astype(bool)]
        if self.values.shape[1] == 0:
            return np.broadcast_to(self.zero, (len(self.values), len(i), len(self.zero))).astype(np.float64)
        return np.where((i >= 0)[None, :, None], self.values[:, np.maximum(i, 0)], self.zero)


def expected_values(*args, **kwargs):
    """E[target values | rates] of every bin of the given patches: (patch, gene, row, col), unscaled; the arguments
    of :func:`expected_draws` (``key`` seeds the draws: the dataset fingerprint and sample in :func:`noise_ceiling`).
    """
    out = expected_draws(*args, **kwargs)
    return None if out is None else out.patch_maps()


def expected_draws(
    path: str,
    kind: str,
    origins: np.ndarray,
    panel: tuple[str, ...],
    key: str,
    draws: int = DRAWS,
    groups: int = GROUPS,
) -> Draws | None:
    """The groups of Monte Carlo estimates behind :func:`expected_values` (None: a truth file without the noise model).

    ``draws``: draws of each bin's library (every gene); each panel gene's own count is summed over exactly.
    """
    origins = np.asarray(origins, dtype=np.int64)
    return _expected(path, kind, panel, draws, groups, key, origins.tobytes(), len(origins))


@lru_cache(maxsize=16)
def _expected(path: str, kind: str, panel: tuple[str, ...], draws: int, groups: int, key: str, origin_bytes, n: int):
    import h5py

    if draws % groups:
        raise ValueError(f"{draws} draws do not split into {groups} groups")
    with h5py.File(path, "r") as f:
        if "nb_size" not in f.attrs or "rates" not in f:
            return None  # a truth file from before the noise model was recorded
        k = float(f.attrs["nb_size"])
        barcodes = [b.decode() for b in f["barcodes"][()]]
        gene_ids = [g.decode() for g in f["gene_ids"][()]]
        rates = f["rates"][()].astype(np.float64)
    origins = np.frombuffer(origin_bytes, dtype=np.int64).reshape(n, 2)
    rr, cc = np.array([parse_bin_barcode(b) for b in barcodes], np.int64).reshape(-1, 2).T
    b = GEOMETRY.bins
    shape = (max(rr.max() + 1, int(origins[:, 0].max()) + b), max(cc.max() + 1, int(origins[:, 1].max()) + b))
    grid = np.full(shape, -1, np.int64)
    grid[rr, cc] = np.arange(len(barcodes))
    idx = gather_windows(grid, origins)  # (n, 32, 32) row of ``rates``; -1: a bin without counts
    needed = np.unique(idx[idx >= 0])
    cols = np.array([gene_ids.index(g) for g in panel])
    rng = np.random.default_rng([zlib.crc32(key.encode()), draws])
    values = np.empty((groups, len(needed), len(panel)))
    block = max(1, BLOCK_DRAWS // (draws * rates.shape[1]))  # bins at a time: memory flat in the gene count
    for a in range(0, len(needed), block):
        r = rates[needed[a : a + block]]
        counts = rng.poisson(r[None] * rng.gamma(k, 1 / k, (draws, *r.shape)))  # every gene: the libraries
        rest = counts.sum(axis=2)[..., None] - counts[..., cols]  # (draw, bin, panel): the other genes' UMIs
        exact = own_count_expectation(kind, r[:, cols], rest, k)  # (draw, bin, panel)
        values[:, a : a + block] = exact.reshape(groups, draws // groups, *exact.shape[1:]).mean(axis=1)
    zero = target_values(kind, np.zeros((1, len(panel))), np.zeros(1))[0].astype(np.float64)  # a bin without counts
    pos = np.where(idx >= 0, np.searchsorted(needed, np.maximum(idx, 0)), -1)
    return Draws(values, pos, zero)


def own_count_expectation(kind: str, mean: np.ndarray, rest: np.ndarray, k: float) -> np.ndarray:
    """E over a gene's own count c ~ NB(mean, size k) of target(c, library c + rest), for each drawn ``rest``.

    mean (bins, genes); rest (draws, bins, genes), the library's other UMIs (independent of c given the rates).
    The sum over c is exact up to a tail of probability < 1e-6 at the synthetic size k = 2.5 (~1e-5 at k = 1;
    the count's distribution is renormalised over the terms kept); pairs of similar reach share one length of sum,
    so the work follows each mean.
    """
    from scipy.special import gammaln

    flat_mean, flat_rest = mean.reshape(-1), rest.reshape(len(rest), -1)
    out = np.empty(flat_rest.shape)
    reach = flat_mean + 10 * np.sqrt(flat_mean + flat_mean**2 / k) + 8  # beyond it: < 1e-6 of the mass
    length = np.ceil(2 ** (np.ceil(4 * np.log2(reach)) / 4)).astype(np.int64)  # 19 % steps: few distinct lengths
    for size in np.unique(length):
        pairs = np.flatnonzero(length == size)
        c = np.arange(size, dtype=np.float64)
        step = max(1, BLOCK_DRAWS // (size * len(rest)))
        for a in range(0, len(pairs), step):
            p = pairs[a : a + step]
            m = flat_mean[p, None]
            logp = (
                gammaln(c + k)
                - gammaln(k)
                - gammaln(c + 1)
                + k * np.log(k / (k + m))
                + c * np.log(m / (k + m) + 1e-300)
            )
            pmf = np.exp(logp)
            pmf /= pmf.sum(axis=1, keepdims=True)
            own = np.broadcast_to(c, (len(rest), len(p), size))
            f = target_values(kind, own[..., None], own + flat_rest[:, p, None])[..., 0]  # (draw, pair, c)
            out[:, p] = np.einsum("dpc,pc->dp", f, pmf)
    return out.reshape(rest.shape)
