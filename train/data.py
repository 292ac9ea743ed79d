"""Cached token grids and targets, opened lazily (xarray + Dask) and streamed in shuffled batches.

* :class:`FoldInputs` opens one dataset's feature store and targets, checks that they belong
  together (dataset fingerprint, patch origins, completeness) and splits the patches of a fold:
  the test patient, and a spatially blocked validation split drawn from the training patients.
* :class:`TargetTransform`: counts per 10k → log1p → z-score per gene, statistics from the
  training patients' in-tissue bins only.
* :class:`Batches`: chunk-aware shuffling (chunk order shuffled, then a shuffle buffer), a
  background prefetch thread, and an optional in-memory mode that makes epochs pure compute.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import xarray as xr

from featcache.catalog import store_status
from featcache.errors import FeatcacheError
from featcache.prepare import load_dataset_meta
from featcache.workspace import Workspace

CHANNEL_FIRST = ("patch", "channel", "row", "col")


def _open(path, group):
    return xr.open_zarr(path, group=group, consolidated=False)


@dataclass
class SampleArrays:
    tokens: xr.DataArray  # (patch, channel, h, w), lazy
    counts: xr.DataArray  # (patch, gene, row, col), lazy
    library: xr.DataArray  # (patch, row, col)
    mask: xr.DataArray  # (patch, row, col)
    origin: np.ndarray
    chunk: int


class FoldInputs:
    """A dataset's model inputs and targets, checked for consistency.

    The inputs are the cached token grids of one feature store, or, with ``store_name=None``
    (fine-tuning), the image patches themselves from patches.zarr.
    """

    def __init__(self, workspace: Workspace, dataset: str, store_name: str | None, make_hint: str = ""):
        self.workspace = workspace
        self.meta = load_dataset_meta(workspace, dataset)
        self.dataset = dataset
        self.images = store_name is None
        if self.images:
            self.store = workspace.patches_store(dataset)
            self.identity = {"source": "patches.zarr", "dataset_fingerprint": self.meta["fingerprint"]}
        else:
            self.store = workspace.features_store(dataset, store_name)
            self.identity = self._check_store(store_name, make_hint)
        self.samples = list(self.meta["samples"])
        self.genes = [str(g) for g in _open(workspace.targets_store(dataset), self.samples[0]).gene.values]
        self.arrays: dict[str, SampleArrays] = {}
        for s in self.samples:
            f = _open(self.store, s)
            t = _open(workspace.targets_store(dataset), s)
            if list(t.gene_id.values) != list(self.meta["genes"]["ids"]):
                raise FeatcacheError(f"targets of {s} have another gene panel than dataset.json; re-prepare the dataset.")
            if not np.array_equal(f.origin.values, t.origin.values):
                raise FeatcacheError(f"{self.store} and the targets of {s} list different patches; "
                                     "re-extract the features with --overwrite.")
            x = f.image if self.images else f.tokens.transpose(*CHANNEL_FIRST)
            chunk = x.encoding.get("chunks", (8,))[0] if self.images else int(self.identity["chunk_patches"])
            self.arrays[s] = SampleArrays(x, t.counts, t.library_size, t.mask, t.origin.values, int(chunk))

    def _check_store(self, store_name: str, make_hint: str) -> dict:
        if not (self.store / "zarr.json").is_file():
            raise FeatcacheError(f"no feature store {store_name!r} for dataset {self.dataset!r} at {self.store}. "
                                 f"Make it with `{make_hint}`.")
        status = store_status(self.store)
        if not status.complete:
            missing = {s: f"{d}/{t}" for s, (d, t) in status.samples.items() if d < t}
            raise FeatcacheError(f"feature store {self.store} is incomplete (chunks done: {missing}). "
                                 f"Finish it by rerunning `{make_hint}`.")
        if status.identity.get("dataset_fingerprint") != self.meta["fingerprint"]:
            raise FeatcacheError(
                f"feature store {self.store} was extracted from other patches than dataset {self.dataset!r} now holds "
                "(dataset fingerprint differs; the dataset was re-prepared?). Re-extract it with --overwrite."
            )
        return status.identity

    @property
    def channels(self) -> int:
        return int(self.identity["dim"])


def blocked_split(origins: dict[str, np.ndarray], fraction: float, seed: int, block_bins: int = 64
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
    def fit(cls, parts) -> "TargetTransform":
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


def read_tokens(arrays: SampleArrays, sample: str, idx: np.ndarray) -> np.ndarray:
    """Model inputs of the given patches: token grids (checked finite) or uint8 images."""
    tokens = np.asarray(arrays.tokens.data[idx].compute())
    if tokens.dtype.kind == "f" and not np.isfinite(tokens).all():
        bad = sorted({int(idx[i]) for i in np.argwhere(~np.isfinite(tokens))[:, 0]})
        raise FeatcacheError(
            f"non-finite features in sample {sample}, patches {bad[:5]}{' ...' if len(bad) > 5 else ''}. The feature "
            "store is damaged: run `featcache verify STORE`, then re-extract with --overwrite."
        )
    return tokens


def load_targets(arrays: SampleArrays, idx: np.ndarray):
    return (np.asarray(arrays.counts.data[idx].compute()), np.asarray(arrays.library.data[idx].compute()),
            np.asarray(arrays.mask.data[idx].compute()))


def memory_budget() -> int:
    """Bytes we allow an in-memory training set to take: 40 % of the machine's physical memory."""
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Batches:
    """Shuffled (or ordered) batches of (tokens float16, targets float32, mask bool) numpy arrays."""

    def __init__(self, inputs: FoldInputs, selection: dict[str, np.ndarray], transform: TargetTransform,
                 batch_size: int, in_memory: bool, buffer_chunks: int = 4, prefetch: int = 3):
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
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for u in units:
                    if stop.is_set():
                        return
                    q.put(self._get(u))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        buf: list = []
        held = 0
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    buf.append(item)
                    held += len(item[0])
                if item is None or held >= self.buffer_chunks * self.batch_size or not shuffle:
                    if not buf:
                        break
                    tok, y, m, keys = (np.concatenate([b[i] for b in buf]) if i < 3 else sum((b[3] for b in buf), [])
                                       for i in range(4))
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
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
