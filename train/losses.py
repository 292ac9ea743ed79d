"""Training losses (``--loss``): MSE in target space, or a count likelihood of the raw counts (docs/design.md §6).

* ``mse`` (default): the decoder's output is the target itself (z-scored log1p(CP10k), or log1p(counts));
  the loss is the masked mean squared error, as it always was.
* ``poisson``: the output o per bin and gene is a log-rate **per 10k UMIs**: the expected raw count is
  μ = exp(o) × L / 10⁴, L = the bin's Gene Expression UMIs (its library size, the exposure; at least 1, as
  the target transform floors it). Loss: the Poisson negative log-likelihood μ − y log μ + log y! of the raw
  counts y over the scored bins.
* ``nb``: the same mean, negative binomial NLL with a learned per-gene size θ (Var = μ + μ²/θ), log θ a
  parameter of the model (:class:`CountHead`, saved in the checkpoint), initialised at θ = 1.

The count head adds a fixed per-gene offset, log(Σ y / Σ L × 10⁴) over the training patients' in-tissue bins
(the constant-rate Poisson fit), so an untrained decoder starts at each gene's mean rate.

**Into target space** (:func:`to_target`), for selection, every metric and ``predictions.zarr``'s ``pred``:
the predicted mean count goes through the run's transform, log1p(CP10k) = log1p(μ / L × 10⁴) = log1p(exp(o))
(no library needed), z-scored with the training statistics; log1p(counts) = log1p(μ) = log1p(exp(o) × L̃ / 10⁴)
with L̃ the training patients' median in-tissue library for every bin, in scoring as in ``featcache predict``
(the scored bins' own depth belongs to the truth, not to the prediction).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.config import LOSS_TEXT, LOSSES, MAPPING_TEXT  # noqa: F401 - the texts live with the settings

PER = 1e4  # the rate's unit: counts per 10k UMIs of the bin


def log_exposure(library: torch.Tensor) -> torch.Tensor:
    """log(L / 10⁴) of each bin, L floored at 1 as the target transform floors it."""
    return torch.log(library.float().clamp(min=1.0) / PER)


def poisson_nll(log_mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−log Poisson(y; μ) per element, exactly (log y! included): μ − y log μ + lgamma(y + 1)."""
    return torch.exp(log_mu) - y * log_mu + torch.lgamma(y + 1)


def nb_nll(log_mu: torch.Tensor, y: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """−log NB(y; mean μ, size θ) per element, from logs (stable for large and small μ and θ):

    −[lgamma(y+θ) − lgamma(θ) − lgamma(y+1) + θ (log θ − log(θ+μ)) + y (log μ − log(θ+μ))].
    """
    theta = torch.exp(log_theta)
    log_sum = torch.logaddexp(log_theta, log_mu)
    return -(
        torch.lgamma(y + theta)
        - torch.lgamma(theta)
        - torch.lgamma(y + 1)
        + theta * (log_theta - log_sum)
        + y * (log_mu - log_sum)
    )


class CountHead(nn.Module):
    """decoder output + a fixed per-gene log base rate = log expected counts per 10k UMIs; ``nb``: log θ too."""

    def __init__(self, net: nn.Module, n_genes: int, nb: bool):
        super().__init__()
        self.net = net
        self.register_buffer("log_base", torch.zeros(n_genes))
        # The training patients' median in-tissue library size: the exposure a log1p-counts run's predictions
        # assume for every bin (the test bins' measured depth is the truth's, never the prediction's).
        self.register_buffer("median_library", torch.tensor(PER))
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if nb else None
        # The output layer starts at zero, so every bin starts at its gene's training rate (log_base): with the
        # decoder's Kaiming init the first log-rates are O(10), exp() of them overflows the Poisson gradient
        # (μ − y) and training at lr 1e-3 diverges (measured on the demo; the bounded NB gradient survives it).
        last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.log_base[None, :, None, None]


def count_head(model: nn.Module) -> CountHead | None:
    """The model's count head (a decoder alone or inside an encoder + decoder), or None for an MSE model."""
    return next((m for m in model.modules() if isinstance(m, CountHead)), None)


def to_target(log_rate, transform, library=None, predict_library: float | None = None):
    """A count model's output (patch, gene, row, col) in the run's target space (numpy in, numpy out).

    log1p-cp10k: log1p(exp(o)), z-scored; log1p-counts: log1p(exp(o) × L / 10⁴), L = ``library`` (patch, row,
    col) or, without one, ``predict_library``.
    """
    o = torch.as_tensor(np.asarray(log_rate, dtype=np.float32))
    if transform.kind == "log1p-counts":
        if library is not None:
            o = o + log_exposure(torch.as_tensor(np.asarray(library)))[:, None]
        else:
            o = o + math.log(max(float(predict_library), 1.0) / PER)
    v = F.softplus(o).numpy()  # log1p(exp(·)): log1p of the expected count in the transform's units
    return transform.scale(v)


def predict_exposure(kind: str, median_library: float) -> dict:
    """The library size ``featcache predict`` assumes for every bin of an unsequenced slide, and why."""
    if kind == "log1p-counts":
        return {
            "library_size": float(median_library),
            "rule": "the training patients' median in-tissue library size (log1p(counts) needs one; the slide's "
            "own depth is unknown)",
        }
    return {"library_size": PER, "rule": "rates per 10k UMIs: log1p(CP10k) needs no library size (exact)"}


class TargetSpace(nn.Module):
    """A reloaded count model's output mapped into its run's target space (what ``featcache predict`` writes)."""

    def __init__(self, transform, predict_library: float):
        super().__init__()
        self.transform, self.predict_library = transform, predict_library

    def forward(self, log_rate: torch.Tensor) -> torch.Tensor:
        out = to_target(log_rate.float().cpu().numpy(), self.transform, predict_library=self.predict_library)
        return torch.from_numpy(out).to(log_rate.device)


class MSE:
    """The loss every run had before ``--loss``: batches carry target-space values (the transform's)."""

    kind = "mse"

    def n_genes(self, y) -> int:
        return y.shape[1]

    def loss(self, pred: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return ((pred - y) ** 2 * m.unsqueeze(1).float()).sum()

    def val_loss(self, p: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
        return float(np.sum((p - y) ** 2 * m[:, None]) / max(m.sum() * y.shape[1], 1))

    def scored(self, out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, truth) in target space of a batch's model output and targets."""
        return out, y

    def predicted(self, out: np.ndarray, library: np.ndarray) -> np.ndarray:
        return out


class CountLoss:
    """Poisson or NB NLL of raw counts: batches carry (counts of the G genes, library) as G + 1 channels
    (:func:`pack`), so shuffling, augmentation and in-memory caching treat them as they treat targets."""

    def __init__(self, kind: str, transform, head: CountHead):
        self.kind, self.transform, self.head = kind, transform, head

    def n_genes(self, y) -> int:
        return y.shape[1] - 1

    def nll(self, log_rate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        counts, library = y[:, :-1], y[:, -1]
        log_mu = log_rate + log_exposure(library)[:, None]
        if self.kind == "poisson":
            return poisson_nll(log_mu, counts)
        return nb_nll(log_mu, counts, self.head.log_theta[None, :, None, None])

    def loss(self, log_rate: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (self.nll(log_rate, y) * m.unsqueeze(1).float()).sum()

    def val_loss(self, p: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
        total = 0.0
        with torch.no_grad():
            for a in range(0, len(p), 64):  # a few patches at a time: the NLL's temporaries are p-sized
                t = (torch.from_numpy(v[a : a + 64]) for v in (p, y, m))
                total += float(self.loss(*t))
        return total / max(float(m.sum()) * self.n_genes(y), 1.0)

    def scored(self, out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.predicted(out, y[:, -1]), self.transform(y[:, :-1], y[:, -1])

    def predicted(self, out: np.ndarray, library: np.ndarray) -> np.ndarray:
        """Target-space predictions without the scored bins' measured depth (for log1p-counts, the training
        median library: what ``featcache predict`` assumes too), so a count run is scored as an MSE run is."""
        return to_target(out, self.transform, predict_library=float(self.head.median_library))


def pack(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """Raw counts (P, G, R, C) and library sizes (P, R, C) as one float32 (P, G + 1, R, C) array."""
    return np.concatenate([np.asarray(counts, np.float32), np.asarray(library, np.float32)[:, None]], axis=1)


class CountStats:
    """What a count model takes from the training patients' in-tissue bins, gathered while the target
    transform is fitted: each gene's log base rate and the median library size."""

    def __init__(self):
        self.counts = self.exposure = None
        self.libraries: list[np.ndarray] = []

    def observe(self, parts):
        """Pass (counts, library, mask) parts through, accumulating their statistics."""
        for counts, library, mask in parts:
            m = np.asarray(mask, bool)
            lib = np.asarray(library, np.float64)
            c = (np.asarray(counts, np.float64) * m[:, None]).sum(axis=(0, 2, 3))
            e = np.maximum(lib, 1.0)[m].sum()
            self.counts = c if self.counts is None else self.counts + c
            self.exposure = e if self.exposure is None else self.exposure + e
            self.libraries.append(lib[m])
            yield counts, library, mask

    @property
    def log_base(self) -> np.ndarray:
        return np.log(np.maximum(self.counts, 0.5) / max(self.exposure, 1.0) * PER)

    @property
    def median_library(self) -> float:
        return float(np.median(np.concatenate(self.libraries))) if self.libraries else PER

    def to_json(self) -> dict:
        return {"median_library": self.median_library, "log_base": self.log_base.tolist()}


def dispersion(model, genes: list[str]) -> dict | None:
    """An NB model's learned size θ per gene (None for MSE and Poisson), for metrics.json."""
    head = count_head(model)
    if head is None or head.log_theta is None:
        return None
    theta = torch.exp(head.log_theta.detach().float().cpu()).numpy()
    return {"median": float(np.median(theta)), "per_gene": {g: float(t) for g, t in zip(genes, theta)}}


def objective(cfg, transform, model) -> MSE | CountLoss:
    """The run's loss; a count loss reads its dispersion from the model's count head."""
    return MSE() if cfg.loss == "mse" else CountLoss(cfg.loss, transform, count_head(model))
