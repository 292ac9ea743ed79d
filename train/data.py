"""Cached token grids and targets, opened lazily (xarray + Dask) and streamed in shuffled batches.

* :class:`FoldInputs` opens one dataset's model inputs (a feature store's token grids, or the
  image patches for fine-tuning) and its targets through the store layer, and checks that they
  belong together (dataset fingerprint, patch origins, completeness).
* :func:`blocked_split`: a validation split of whole spatial blocks of the training patients.
* :class:`TargetTransform`: counts per 10k → log1p → z-score per gene, statistics from the
  training patients' in-tissue bins only.
* :class:`Batches`: blocks of whole token and target chunks (:func:`read_block`), read in a
  background :class:`~featcache.streams.Prefetcher` two at a time, block order shuffled and
  patches mixed in a buffer, each patch copied once into its batch; an optional in-memory mode
  makes epochs pure compute. Measured against raw chunk reads in benchmarks/streaming.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, first_cover
from featcache.stores import Dataset, FeatureStore
from featcache.stores.features import CHANNEL_FIRST, all_finite, token_dims
from featcache.stores.zarrio import missing_chunks
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
    target_chunk: int = 1
    sample: str = ""
    source: object = None  # the FoldInputs that opened these arrays (to explain a damaged chunk)

    def read_error(self, name: str, idx, exc: Exception) -> FeatcacheError:
        sample = self.sample
        inputs = self.source
        if name == "tokens" and not inputs.images:
            return inputs.store.read_error(sample, inputs.token_name, idx, exc)
        stored = {"tokens": inputs.image_name, "library": "library_size"}.get(name, name)
        return inputs.dataset.read_error(sample, stored, idx, exc)


class FoldInputs:
    """A dataset's model inputs and targets, checked for consistency.

    The inputs are the cached token grids of ``store`` (its final ``tokens``, or with ``layer`` its
    ``tokens_<layer>``), or, with ``store=None`` (fine-tuning), the image patches themselves, in the rendering
    of the encoder's ``px_per_bin`` (``image`` at 14, ``image_16px`` at 16: docs/design.md §2), refused with the
    command that adds it when the dataset lacks it.
    """

    def __init__(
        self,
        dataset: Dataset,
        store: FeatureStore | None,
        layer: int | None = None,
        px_per_bin: int = GEOMETRY.px_per_bin,
    ):
        self.dataset = dataset
        self.meta = dataset.meta
        self.store = store
        self.layer = layer
        self.token_name = "tokens" if layer is None else f"tokens_{layer}"
        self.images = store is None
        self.image_name = dataset.image_name(px_per_bin, reader="fine-tuning") if self.images else None
        self.identity = (
            {"source": "patches.zarr", "dataset_fingerprint": dataset.fingerprint}
            if self.images
            else self._check_store(store)
        )
        if self.images and px_per_bin != GEOMETRY.px_per_bin:  # a 14 px run's identity is the one it always had
            self.identity["source"] = f"patches.zarr/{self.image_name}"
        # the pixels per bin of what the encoder read: the rendering fine-tuned on, or the store's geometry
        self.px_per_bin = px_per_bin if self.images else int(self.identity.get("geometry", {}).get("px_per_bin", 14))
        self.samples = dataset.samples
        self.arrays: dict[str, SampleArrays] = {}
        for s in self.samples:
            dataset.check_chunks(s, ("counts", "library_size", "mask") + ((self.image_name,) if self.images else ()))
            t = dataset.targets(s)
            if list(t.gene_id.values) != dataset.gene_ids:
                raise FeatcacheError(
                    f"targets of {s} have another gene panel than dataset.json; prepare the dataset "
                    "again with --overwrite."
                )
            if self.images:
                x, chunk = dataset.images(s, px_per_bin), dataset.image_array(s, px_per_bin).chunks[0]
            else:
                f = store.open_sample(s)
                if not np.array_equal(f.origin.values, t.origin.values):
                    raise FeatcacheError(
                        f"{store} and the targets of {s} list different patches; re-extract the "
                        "features with --overwrite."
                    )
                x, chunk = token_dims(f[self.token_name]).transpose(*CHANNEL_FIRST), self.identity["chunk_patches"]
            target_chunk = int(t.counts.encoding.get("chunks", (1,))[0])
            self.arrays[s] = SampleArrays(
                x, t.counts, t.library_size, t.mask, t.origin.values, int(chunk), target_chunk, s, self
            )
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
        store.check_layer(self.layer)
        if status.identity.get("dataset_fingerprint") != self.dataset.fingerprint:
            raise FeatcacheError(
                f"feature store {store} was extracted from other patches than dataset {self.dataset.name!r} now holds "
                "(dataset fingerprint differs; the dataset was re-prepared?). Re-extract it with --overwrite."
            )
        return status.identity

    @property
    def channels(self) -> int:
        if self.layer is not None:
            return int(self.identity["layers"][self.token_name]["dim"])
        return int(self.identity["dim"])

    def check_fold(self, fold: str) -> None:
        patients = self.dataset.patients
        if fold not in patients:
            raise FeatcacheError(
                f"--fold {fold!r} is not a patient of dataset {self.dataset.name!r} (patients: {', '.join(patients)})."
            )
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
    origins: dict[str, np.ndarray],
    fraction: float,
    seed: int,
    block_bins: int = BLOCK_BINS,
    buffer_bins: int = GEOMETRY.bins,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Validation = one compact region of whole block_bins × block_bins blocks in each training sample.

    Each sample gives about ``fraction`` of its patches: blocks are taken in order of their distance
    from a seeded random block, so the region is compact and its border short. Training patches
    closer to a validation patch than ``buffer_bins`` (one patch width, 32 bins), edge to edge, are
    left out of training, whatever the stride: no training patch shares tissue, a border or its
    nearest 32 bins with validation.
    """
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for s, o in origins.items():
        blocks = o.astype(np.int64) // block_bins
        unique, which, sizes = np.unique(blocks, axis=0, return_inverse=True, return_counts=True)
        want = int(round(fraction * len(o)))
        chosen: list[int] = []
        if want and len(o) > 1:
            start = unique[rng.integers(len(unique))]
            order = np.lexsort((rng.random(len(unique)), np.abs(unique - start).max(axis=1)))
            for k in order:
                if sizes[chosen].sum() >= want or sizes[chosen].sum() + sizes[k] >= len(o):
                    break
                chosen.append(int(k))
        in_val = np.isin(which.ravel(), chosen)
        # windows of GEOMETRY.bins: an edge-to-edge gap below buffer_bins is an origin distance below bins + buffer
        train[s] = np.flatnonzero(~in_val & ~near(o, o[in_val], GEOMETRY.bins + buffer_bins - 1))
        val[s] = np.flatnonzero(in_val)
    return train, val


def near(origins: np.ndarray, others: np.ndarray, distance: int) -> np.ndarray:
    """For each origin: is some other origin within ``distance`` bins along both axes (windows overlap or adjoin)?"""
    if len(others) == 0 or len(origins) == 0:
        return np.zeros(len(origins), bool)
    d = np.abs(origins[:, None, :].astype(np.int64) - others[None, :, :].astype(np.int64)).max(axis=2)
    return (d <= distance).any(axis=1)


def target_values(kind: str, counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """log1p(CP10k) (``log1p-cp10k``) or log1p(counts) (``log1p-counts``); counts (..., genes), library (...)."""
    counts = np.asarray(counts, dtype=np.float32)
    if kind == "log1p-counts":
        return np.log1p(counts)
    return np.log1p(counts * (np.float32(1e4) / np.maximum(np.asarray(library, dtype=np.float32), 1.0))[..., None])


class TargetTransform:
    """Counts → the target space the decoder learns and is scored in.

    ``log1p-cp10k`` (ours): counts per 10k of the bin's Gene Expression UMIs, log1p, then z-scored
    per gene with statistics of the training patients' in-tissue bins only. ``log1p-counts`` (the
    reference pipeline): log1p of the raw counts, nothing else.
    """

    def __init__(self, kind: str, mean, std):
        self.kind = kind
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)

    @property
    def zscored(self) -> bool:
        return self.kind == "log1p-cp10k"

    def values(self, counts: np.ndarray, library: np.ndarray) -> np.ndarray:
        """The target before scaling: counts (..., G, R, C), library (..., R, C)."""
        genes_last = target_values(self.kind, np.moveaxis(np.asarray(counts), -3, -1), np.asarray(library))
        return np.moveaxis(genes_last, -1, -3)

    def scale(self, values: np.ndarray) -> np.ndarray:
        if not self.zscored:
            return values.astype(np.float32)
        shape = (1,) * (values.ndim - 3) + (-1, 1, 1)
        mean, std = self.mean.astype(np.float32).reshape(shape), self.std.astype(np.float32).reshape(shape)
        return ((values - mean) / std).astype(np.float32)

    @classmethod
    def fit(cls, parts, kind: str = "log1p-cp10k") -> TargetTransform:
        """parts: iterable of (counts (P,G,R,C), library (P,R,C), mask (P,R,C)) of the training patients."""
        s = ss = n = None
        probe = cls(kind, 0.0, 1.0)
        for counts, library, mask in parts:
            x = probe.values(counts, library).astype(np.float64)
            m = mask[:, None].astype(np.float64)
            s0, ss0 = (x * m).sum(axis=(0, 2, 3)), (x * x * m).sum(axis=(0, 2, 3))
            s, ss, n = (s0, ss0, m.sum()) if s is None else (s + s0, ss + ss0, n + m.sum())
        if not n:
            raise FeatcacheError("the training patients have no in-tissue bins to fit the target transform on.")
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
        return cls(kind, mean, np.where(std > 1e-8, std, 1.0))

    def __call__(self, counts: np.ndarray, library: np.ndarray) -> np.ndarray:
        return self.scale(self.values(counts, library))

    @property
    def target_mean(self) -> np.ndarray:
        """Each gene's training mean in target space (what unscored bins are filled with for SSIM)."""
        return np.zeros_like(self.mean) if self.zscored else self.mean

    def to_json(self) -> dict:
        return {"kind": self.kind, "zscored": self.zscored, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> TargetTransform:
        kind = d.get("kind", "log1p-cp10k")
        return cls("log1p-cp10k" if kind.startswith("log1p(cp10k)") else kind, d["mean"], d["std"])


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
    if not all_finite(tokens):
        bad = sorted({int(idx[i]) for i in np.argwhere(~np.isfinite(tokens))[:, 0]})
        store = getattr(arrays.source, "store", None)
        where, gone = "STORE", ""
        if store is not None:
            where = str(store.loc)
            if store.path is not None:  # a deleted chunk file reads as NaN (the fill value): name the file
                name = arrays.source.token_name
                files = missing_chunks(store.group("r")[sample][name], store.path / sample / name)
                gone = f" (chunk file(s) missing: {', '.join(f'{sample}/{name}/{k}' for k in files[:3])})" * bool(files)
        raise FeatcacheError(
            f"non-finite features in sample {sample}, patches {bad[:5]}{' ...' if len(bad) > 5 else ''}{gone}. The "
            f"feature store is damaged: run `featcache verify --repair {where}`, then rerun `featcache extract`."
        )
    return tokens


def read_block(arrays: SampleArrays, a: int, b: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of patches [a, b) as one array per patch, and their counts, library sizes and mask.

    One Dask computation of the block's chunks, each input chunk its own output: a batch later gathers
    patches from them directly, so the tokens are copied once (into the batch) and never concatenated
    (at a ViT's 3 MB per patch, each extra copy costs a tenth of the decoding time).
    """
    names = ("tokens", "counts", "library", "mask")
    lazy = [getattr(arrays, n).data[a:b] for n in names]
    pieces = [lazy[0].blocks[i] for i in range(lazy[0].numblocks[0])]
    try:
        out = dask.compute(*pieces, *lazy[1:], scheduler="threads", num_workers=2)
    except Exception as exc:  # noqa: BLE001 - zarr reports checksum and decompression failures as plain errors
        bad = next((n for n, x in zip(names, lazy) if _fails(x)), "tokens")
        raise arrays.read_error(bad, np.arange(a, min(b, len(arrays.origin))), exc) from None
    tokens = [patch for chunk in out[: len(pieces)] for patch in chunk]
    return (tokens, *out[len(pieces) :])


def _fails(lazy) -> bool:
    try:
        lazy.compute(scheduler="synchronous")
        return False
    except Exception:  # noqa: BLE001
        return True


def load_targets(arrays: SampleArrays, idx: np.ndarray):
    """Raw counts, library sizes and the in-tissue mask of the given patches."""
    return tuple(_compute(arrays, name, idx) for name in ("counts", "library", "mask"))


def fit_targets(arrays: SampleArrays):
    """What :meth:`TargetTransform.fit` takes from one training section: counts, library sizes and the in-tissue
    mask of every patch, the mask keeping each section bin once (overlapping patches at a stride below 32 bins
    would count a bin up to (32/stride)² times, weighting the statistics towards the tissue's interior)."""
    counts, library, mask = load_targets(arrays, np.arange(len(arrays.origin)))
    return counts, library, np.asarray(mask).astype(bool) & first_cover(arrays.origin)


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
        all_bins: bool = False,
    ):
        """``all_bins``: every bin of a patch counts (the reference pipeline's scoring), not just in-tissue ones."""
        self.inputs = inputs
        self.all_bins = all_bins
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
        """(sample, first, last+1) ranges that hold whole chunks of the inputs and of the targets, restricted to
        the selection: each stored chunk is decoded once per epoch."""
        out = []
        for s, idx in self.selection.items():
            k = math.lcm(self.inputs.arrays[s].chunk, self.inputs.arrays[s].target_chunk)
            for c in np.unique(idx // k):
                out.append((s, int(c * k), int((c + 1) * k)))
        return out

    def _read(self, s, a, b):
        arr = self.inputs.arrays[s]
        idx = self.selection[s]
        idx = idx[(idx >= a) & (idx < b)]
        tokens, counts, library, mask = read_block(arr, a, b)
        if len(idx) != len(tokens) or idx[0] != a:  # a part of the block is selected: keep only that
            keep = idx - a
            tokens, counts, library, mask = [tokens[i] for i in keep], counts[keep], library[keep], mask[keep]
        if not all(all_finite(t) for t in tokens):
            read_tokens(arr, s, idx)  # one pass, no mask array; on a NaN or inf this names the damaged patches
        mask = np.ones(mask.shape, bool) if self.all_bins else mask.astype(bool)
        return tokens, self.transform(counts, library), mask, [(s, int(i)) for i in idx]

    def _get(self, unit):
        return self.cache[unit] if self.cache is not None else self._read(*unit)

    def epoch(self, shuffle: bool, seed: int = 0):
        """Yield batches; with shuffle, block order is permuted and patches mixed in a buffer.

        The buffer holds whole blocks and a pool of (block, row) references; a batch is gathered from
        them in one copy per patch, and a block is let go once its last row has been used.
        """
        rng = np.random.default_rng(seed)
        units = self.units()
        if shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        workers = 1 if self.cache is not None else 2  # decoding releases the GIL: two blocks at a time
        chunks = iter(Prefetcher(self._get, units, workers=workers, depth=self.prefetch, name="featcache-batches"))
        blocks: dict[int, tuple] = {}
        pool: list[tuple[int, int]] = []
        fill = self.buffer_chunks * self.batch_size if shuffle else self.batch_size
        try:
            for k, block in enumerate(chunks):
                blocks[k] = block
                pool += [(k, r) for r in range(len(block[0]))]
                if len(pool) >= fill:
                    yield from self._drain(blocks, pool, rng, shuffle, final=False)
            yield from self._drain(blocks, pool, rng, shuffle, final=True)
        finally:
            chunks.close()

    def _drain(self, blocks: dict, pool: list, rng, shuffle: bool, final: bool):
        order = rng.permutation(len(pool)) if shuffle else np.arange(len(pool))
        chosen = [pool[i] for i in order]
        stop = len(chosen) if final else len(chosen) // self.batch_size * self.batch_size
        for i in range(0, stop, self.batch_size):
            part = chosen[i : i + self.batch_size]
            yield tuple(np.stack([blocks[k][j][r] for k, r in part]) for j in range(3)) + (
                [blocks[k][3][r] for k, r in part],
            )
        pool[:] = chosen[stop:]
        live = {k for k, _ in pool}
        for k in [k for k in blocks if k not in live]:
            del blocks[k]
