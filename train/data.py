"""Cached token grids and targets, opened lazily (xarray + Dask) and streamed in shuffled batches.

* :class:`FoldInputs` opens one dataset's model inputs (a feature store's token grids, or the
  image patches for fine-tuning) and its targets through the store layer, and checks that they
  belong together (dataset fingerprint, patch origins, completeness).
* :func:`blocked_split`: a validation split of whole spatial blocks of the training patients.
* :class:`TargetTransform`: counts per 10k → log1p → z-score per gene, statistics from the
  training patients' in-tissue bins only.
* :class:`Batches`: chunk-aware shuffling (chunk order shuffled, then a shuffle buffer), a
  background :class:`~featcache.streams.Prefetcher`, and an optional in-memory mode that makes
  epochs pure compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import xarray as xr

from featcache.errors import FeatcacheError
from featcache.stores import Dataset, FeatureStore
from featcache.stores.features import CHANNEL_FIRST
from featcache.streams import Prefetcher
from train.config import BLOCK_BINS


@dataclass
class SampleArrays:
    tokens: xr.DataArray  # (patch, channel, h, w) token grids, or (patch, y, x, rgb) uint8 images; lazy
    counts: xr.DataArray  # (patch, gene, row, col), lazy
    library: xr.DataArray  # (patch, row, col)
    mask: xr.DataArray  # (patch, row, col)
    origin: np.ndarray
    chunk: int
    sample: str = ""
    source: object = None  # the FoldInputs that opened these arrays (to explain a damaged chunk)

    def read_error(self, name: str, idx, exc: Exception) -> FeatcacheError:
        sample = self.sample
        inputs = self.source
        if name == "tokens" and not inputs.images:
            return inputs.store.read_error(sample, "tokens", idx, exc)
        stored = {"tokens": "image", "library": "library_size"}.get(name, name)
        return inputs.dataset.read_error(sample, stored, idx, exc)


class FoldInputs:
    """A dataset's model inputs and targets, checked for consistency.

    The inputs are the cached token grids of ``store``, or, with ``store=None`` (fine-tuning),
    the image patches themselves.
    """

    def __init__(self, dataset: Dataset, store: FeatureStore | None):
        self.dataset = dataset
        self.meta = dataset.meta
        self.store = store
        self.images = store is None
        self.identity = (
            {"source": "patches.zarr", "dataset_fingerprint": dataset.fingerprint}
            if self.images
            else self._check_store(store)
        )
        self.samples = dataset.samples
        self.arrays: dict[str, SampleArrays] = {}
        for s in self.samples:
            dataset.check_chunks(s, ("counts", "library_size", "mask") + (("image",) if self.images else ()))
            t = dataset.targets(s)
            if list(t.gene_id.values) != dataset.gene_ids:
                raise FeatcacheError(
                    f"targets of {s} have another gene panel than dataset.json; prepare the dataset "
                    "again with --overwrite."
                )
            if self.images:
                x, chunk = dataset.patches(s).image, dataset.image_array(s).chunks[0]
            else:
                f = store.open_sample(s)
                if not np.array_equal(f.origin.values, t.origin.values):
                    raise FeatcacheError(
                        f"{store} and the targets of {s} list different patches; re-extract the "
                        "features with --overwrite."
                    )
                x, chunk = f.tokens.transpose(*CHANNEL_FIRST), self.identity["chunk_patches"]
            self.arrays[s] = SampleArrays(x, t.counts, t.library_size, t.mask, t.origin.values, int(chunk), s, self)
        self.genes = [str(g) for g in dataset.targets(self.samples[0]).gene.values]

    def _check_store(self, store: FeatureStore) -> dict:
        if not store.exists():
            raise FeatcacheError(
                f"no feature store {store.name!r} for dataset {self.dataset.name!r} at {store}. "
                f"Make it with `{store.make_hint}`."
            )
        status = store.status()
        if not status.complete:
            missing = {s: f"{d}/{t}" for s, (d, t) in status.samples.items() if d < t}
            raise FeatcacheError(
                f"feature store {store} is incomplete (chunks done: {missing}). Finish it by rerunning "
                f"`{store.make_hint}`."
            )
        if status.identity.get("dataset_fingerprint") != self.dataset.fingerprint:
            raise FeatcacheError(
                f"feature store {store} was extracted from other patches than dataset {self.dataset.name!r} now holds "
                "(dataset fingerprint differs; the dataset was re-prepared?). Re-extract it with --overwrite."
            )
        return status.identity

    @property
    def channels(self) -> int:
        return int(self.identity["dim"])

    def check_fold(self, fold: str) -> None:
        patients = self.dataset.patients
        if fold not in patients:
            raise FeatcacheError(f"--fold {fold!r} is not a patient of dataset {self.dataset.name!r} "
                                 f"(patients: {', '.join(patients)}).")  # fmt: skip
        if len(patients) < 2:
            raise FeatcacheError(
                f"dataset {self.dataset.name!r} has one patient; leave-one-patient-out needs at least two."
            )

    def test_samples(self, fold: str) -> list[str]:
        """Every section of the test patient."""
        return self.dataset.patients[fold]

    def train_samples(self, fold: str) -> list[str]:
        """Every section of every other patient (none of the test patient's)."""
        return [s for s in self.samples if self.dataset.patient_of(s) != fold]


def blocked_split(
    origins: dict[str, np.ndarray], fraction: float, seed: int, block_bins: int = BLOCK_BINS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Validation = whole spatial blocks (block_bins × block_bins) of the training patients."""
    block_of = {s: [(s, int(r) // block_bins, int(c) // block_bins) for r, c in o] for s, o in origins.items()}
    sizes: dict = {}
    for blocks in block_of.values():
        for b in blocks:
            sizes[b] = sizes.get(b, 0) + 1
    keys = [b for blocks in block_of.values() for b in sorted(set(blocks))]  # sample order, then block
    total = sum(len(o) for o in origins.values())
    want = int(round(fraction * total))
    val_blocks: set = set()
    n_val = 0
    for i in np.random.default_rng(seed).permutation(len(keys)):
        if n_val >= want or n_val + 1 >= total:
            break
        val_blocks.add(keys[i])
        n_val += sizes[keys[i]]
    train, val = {}, {}
    for s, blocks in block_of.items():
        in_val = np.array([b in val_blocks for b in blocks], dtype=bool)
        train[s] = np.flatnonzero(~in_val)
        val[s] = np.flatnonzero(in_val)
    return train, val


class TargetTransform:
    """counts → CP10k → log1p → z-score per gene, fitted on training bins (in tissue) only."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)

    @staticmethod
    def log_cp10k(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
        lib = np.maximum(library.astype(np.float64), 1.0)[:, None]
        return np.log1p(counts / lib * 1e4)

    @classmethod
    def fit(cls, parts) -> TargetTransform:
        """parts: iterable of (counts (P,G,R,C), library (P,R,C), mask (P,R,C))."""
        s = ss = n = None
        for counts, library, mask in parts:
            x = cls.log_cp10k(counts, library)
            m = mask[:, None].astype(np.float64)
            s0, ss0 = (x * m).sum(axis=(0, 2, 3)), (x * x * m).sum(axis=(0, 2, 3))
            s, ss, n = (s0, ss0, m.sum()) if s is None else (s + s0, ss + ss0, n + m.sum())
        if not n:
            raise FeatcacheError("the training patients have no in-tissue bins to fit the target transform on.")
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
        return cls(mean, np.where(std > 1e-8, std, 1.0))

    def __call__(self, counts: np.ndarray, library: np.ndarray) -> np.ndarray:
        x = self.log_cp10k(counts, library)
        return ((x - self.mean[None, :, None, None]) / self.std[None, :, None, None]).astype(np.float32)

    def to_json(self) -> dict:
        return {"kind": "log1p(cp10k) z-score", "mean": self.mean.tolist(), "std": self.std.tolist()}


def _compute(arrays: SampleArrays, name: str, idx: np.ndarray) -> np.ndarray:
    """Patches ``idx`` of one lazily opened array; a damaged chunk becomes one error naming store, array and chunk."""
    try:
        return np.asarray(getattr(arrays, name).data[idx].compute())
    except FeatcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr reports checksum and decompression failures as plain errors
        raise arrays.read_error(name, idx, exc) from None


def read_tokens(arrays: SampleArrays, sample: str, idx: np.ndarray) -> np.ndarray:
    """Model inputs of the given patches: token grids (checked finite) or uint8 images."""
    tokens = _compute(arrays, "tokens", idx)
    if tokens.dtype.kind == "f" and not np.isfinite(tokens).all():
        bad = sorted({int(idx[i]) for i in np.argwhere(~np.isfinite(tokens))[:, 0]})
        raise FeatcacheError(
            f"non-finite features in sample {sample}, patches {bad[:5]}{' ...' if len(bad) > 5 else ''}. The feature "
            "store is damaged: run `featcache verify --repair STORE`, then rerun `featcache extract`."
        )
    return tokens


def load_targets(arrays: SampleArrays, idx: np.ndarray):
    """Raw counts, library sizes and the in-tissue mask of the given patches."""
    return tuple(_compute(arrays, name, idx) for name in ("counts", "library", "mask"))


def memory_budget() -> int:
    """Bytes we allow an in-memory training set to take: 40 % of the machine's physical memory."""
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Batches:
    """Shuffled (or ordered) batches of (tokens float16, targets float32, mask bool) numpy arrays."""

    def __init__(
        self,
        inputs: FoldInputs,
        selection: dict[str, np.ndarray],
        transform: TargetTransform,
        batch_size: int,
        in_memory: bool,
        buffer_chunks: int = 4,
        prefetch: int = 3,
    ):
        self.inputs = inputs
        self.selection = {s: np.asarray(i) for s, i in selection.items() if len(i)}
        self.transform = transform
        self.batch_size = batch_size
        self.buffer_chunks = buffer_chunks
        self.prefetch = prefetch
        self.n = sum(len(i) for i in self.selection.values())
        self.cache = None
        if in_memory:
            self.cache = {u: self._read(*u) for u in self.units()}

    def units(self) -> list[tuple[str, int, int]]:
        """(sample, first, last+1) ranges of one feature chunk each, restricted to the selection."""
        out = []
        for s, idx in self.selection.items():
            k = self.inputs.arrays[s].chunk
            for c in np.unique(idx // k):
                out.append((s, int(c * k), int((c + 1) * k)))
        return out

    def _read(self, s, a, b):
        arr = self.inputs.arrays[s]
        idx = self.selection[s]
        idx = idx[(idx >= a) & (idx < b)]
        tokens = read_tokens(arr, s, idx)
        counts, library, mask = load_targets(arr, idx)
        return tokens, self.transform(counts, library), mask.astype(bool), [(s, int(i)) for i in idx]

    def _get(self, unit):
        return self.cache[unit] if self.cache is not None else self._read(*unit)

    def epoch(self, shuffle: bool, seed: int = 0):
        """Yield batches; with shuffle, chunk order is permuted and patches mixed in a buffer."""
        rng = np.random.default_rng(seed)
        units = self.units()
        if shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        chunks = iter(Prefetcher(self._get, units, workers=1, depth=self.prefetch, name="featcache-batches"))
        buf: list = []
        held = 0
        try:
            while True:
                item = next(chunks, None)
                if item is not None:
                    buf.append(item)
                    held += len(item[0])
                if item is None or held >= self.buffer_chunks * self.batch_size or not shuffle:
                    if not buf:
                        break
                    tok, y, m, keys = (
                        np.concatenate([b[i] for b in buf]) if i < 3 else sum((b[3] for b in buf), []) for i in range(4)
                    )
                    order = rng.permutation(len(tok)) if shuffle else np.arange(len(tok))
                    final = item is None
                    stop_at = len(order) if final else len(order) // self.batch_size * self.batch_size
                    for i in range(0, stop_at, self.batch_size):
                        sel = order[i : i + self.batch_size]
                        yield tok[sel], y[sel], m[sel], [keys[j] for j in sel]
                    rest = order[stop_at:]
                    buf = [(tok[rest], y[rest], m[rest], [keys[j] for j in rest])] if len(rest) else []
                    held = len(rest)
                if item is None:
                    break
        finally:
            chunks.close()
