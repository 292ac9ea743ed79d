"""The prepared dataset: ``datasets/<dataset>/`` (docs/design.md §7). This file is its format.

::

    patches.zarr/<sample>/image         uint8 (patch, y, x, rgb)   448 × 448 × 3 per patch
    patches.zarr/<sample>/origin        int32 (patch, axis)        array (row, col) of the patch's bin (0, 0)
    targets.zarr/<sample>/counts        int32 (patch, gene, row, col)  raw UMI counts of the gene panel
    targets.zarr/<sample>/library_size  int32 (patch, row, col)   Gene Expression UMIs of the bin
    targets.zarr/<sample>/mask          bool  (patch, row, col)   bin is in tissue (and in the matrix)
    targets.zarr/<sample>/{gene, gene_id, origin}                 coordinates
    dataset.json                        samples, gene panel, geometry, source fingerprints
    qc/<sample>.png                     the slide, its in-tissue bins and the kept patches through the registration

A dataset is built in a hidden folder beside its final place (:class:`DatasetBuilder`) and moved
there only when complete, so an interrupted run never leaves a half-written dataset that looks
finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY
from featcache.stores.files import read_json, staged_dir, write_json
from featcache.stores.zarrio import (
    consolidate,
    create_array,
    missing_chunks,
    open_local,
    read_error,
    write_origins,
    write_strings,
)

DATASET_FORMAT = "featcache.dataset/1"
IMAGE_CHUNK = 8  # patches per image chunk (~4.8 MB raw)
TARGET_CHUNK = 32  # patches per target chunk


def open_lazy(path: Path, group: str | None) -> xr.Dataset:
    """A Zarr group as a lazily loaded (Dask-backed) xarray Dataset."""
    return xr.open_zarr(path, group=group, consolidated=False)


class Dataset:
    """A prepared dataset of the workspace (made by ``featcache prepare``).

    ``patches.zarr`` (uint8 image patches), ``targets.zarr`` (counts, library sizes, in-tissue
    masks) and ``dataset.json`` (samples, their patients, the gene panel, geometry, fingerprint).

    Examples
    --------
    >>> ds = Workspace.resolve().open_dataset("demo")
    >>> ds.patients                        # {"P1": ["P1"], ...}
    >>> ds.targets("P1").counts.sel(gene="EPCAM")
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name

    @property
    def patches_path(self) -> Path:
        return self.path / "patches.zarr"

    @property
    def targets_path(self) -> Path:
        return self.path / "targets.zarr"

    @property
    def meta_path(self) -> Path:
        return self.path / "dataset.json"

    def exists(self) -> bool:
        return self.meta_path.is_file()

    @property
    def qc_dir(self) -> Path:
        return self.path / "qc"

    def qc_path(self, sample: str) -> Path:
        """The sample's QC picture (``featcache prepare`` draws it): slide, in-tissue bins, patch outlines."""
        return self.qc_dir / f"{sample}.png"

    @cached_property
    def meta(self) -> dict:
        meta = read_json(self.meta_path)
        if meta is None:
            raise FeatcacheError(
                f"no prepared dataset {self.name!r} at {self.path}. Make it with "
                "`featcache prepare --dataset NAME --sample NAME=DIR ...`."
            )
        if not isinstance(meta.get("samples"), dict) or not isinstance(meta.get("genes"), dict):
            raise FeatcacheError(
                f"{self.meta_path} is damaged (no samples or genes). Prepare the dataset again with --overwrite."
            )
        return meta

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def samples(self) -> list[str]:
        """The dataset's samples (sections), in the order they were prepared."""
        return list(self.meta["samples"])

    @property
    def gene_ids(self) -> list[str]:
        return list(self.meta["genes"]["ids"])

    @property
    def gene_names(self) -> list[str]:
        return list(self.meta["genes"]["names"])

    @property
    def patients(self) -> dict[str, list[str]]:
        """patient -> its samples (each sample is its own patient unless prepare was told otherwise)."""
        out: dict[str, list[str]] = {}
        for s, info in self.meta["samples"].items():
            out.setdefault(info.get("patient", s), []).append(s)
        return out

    def patient_of(self, sample: str) -> str:
        return self.meta["samples"][sample].get("patient", sample)

    def n_patches(self, sample: str) -> int:
        """How many patches the sample has."""
        return int(self.meta["samples"][sample]["n_patches"])

    def _check_sample(self, sample: str) -> None:
        if sample not in self.meta["samples"]:
            raise FeatcacheError(
                f"dataset {self.name!r} has no sample {sample!r} (samples: {', '.join(self.samples)})."
            )

    def patches(self, sample: str) -> xr.Dataset:
        """One sample's image patches as a lazy (Dask-backed) xarray.Dataset: ``image`` uint8 (patch, y, x, rgb),
        448 × 448 × 3 each, with ``origin`` (patch, axis), the array (row, col) of each patch's bin (0, 0)."""
        self._check_sample(sample)
        return open_lazy(self.patches_path, sample)

    def targets(self, sample: str) -> xr.Dataset:
        """One sample's per-bin targets as a lazy (Dask-backed) xarray.Dataset: ``counts`` int32 (patch, gene, row,
        col) raw UMIs of the panel genes (``gene`` and ``gene_id`` coordinates), ``library_size`` int32 (patch, row,
        col) UMIs of all genes, ``mask`` bool (patch, row, col) in-tissue bins, and ``origin``."""
        self._check_sample(sample)
        return open_lazy(self.targets_path, sample)

    def image_array(self, sample: str) -> zarr.Array:
        """The raw Zarr array of a sample's patches (for readers that decode chunk by chunk)."""
        self._check_sample(sample)
        return open_local(self.patches_path)[sample]["image"]

    @property
    def gene_totals_path(self) -> Path:
        return self.path / "gene_totals.npz"

    def panel_overlap_per_fold(self) -> dict | None:
        """For a ``top-mean:N`` panel: per test patient, how many of the N genes a panel chosen from the training
        patients alone would share (None for a gene-list panel or a dataset without gene totals)."""
        spec = self.meta["genes"].get("spec", "")
        if not spec.startswith("top-mean:") or not self.gene_totals_path.is_file():
            return None
        with np.load(self.gene_totals_path, allow_pickle=False) as f:
            ids, samples, totals, bins = f["ids"], list(f["samples"]), f["totals"], f["n_bins"]
        panel, n = set(self.gene_ids), len(self.gene_ids)
        out = {}
        for patient, held_out in self.patients.items():
            keep = [i for i, s in enumerate(samples) if s not in held_out]
            mean = totals[keep].sum(axis=0) / max(bins[keep].sum(), 1)
            out[patient] = {"shared": len(panel & set(ids[np.argsort(-mean, kind="stable")[:n]])), "of": n}
        return out

    def check_chunks(self, sample: str, names=("counts", "library_size", "mask")) -> None:
        """Refuse a sample whose chunk files of these arrays are missing: zarr would read them as fill values."""
        for name in names:
            store = "patches.zarr" if name == "image" else "targets.zarr"
            arr = open_local(self.path / store)[sample][name]
            missing = missing_chunks(arr, self.path / store / sample / name)
            if missing:
                raise FeatcacheError(
                    f"dataset {self.name!r} is damaged: {store}/{sample}/{name} lacks chunk file(s) "
                    f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}. Prepare it again "
                    "with --overwrite."
                )

    def read_error(self, sample: str, name: str, idx, exc: Exception) -> FeatcacheError:
        """The error for a damaged chunk of this dataset, naming the store, array and chunk."""
        store = "patches.zarr" if name == "image" else "targets.zarr"
        arr = open_local(self.path / store)[sample][name]
        return read_error(
            arr,
            f"{self.path / store}/{sample}/{name}",
            idx,
            exc,
            f"the dataset is damaged: check it with `featcache verify {self.path}` and prepare it "
            "again with --overwrite.",
        )

    def origins(self, sample: str) -> np.ndarray:
        self._check_sample(sample)
        return np.asarray(open_local(self.patches_path)[sample]["origin"][:])

    def bin_map(self, sample: str):
        """The sample's whole-section bin -> full-resolution pixel map (a BinMap), or None when the
        dataset.json predates registration records."""
        from featcache.registration import BinMap

        self._check_sample(sample)
        reg = self.meta["samples"][sample].get("registration", {})
        return BinMap(np.array(reg["global_homography"])) if "global_homography" in reg else None

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "samples": {s: self.n_patches(s) for s in self.samples},
            "patients": len(self.patients),
            "genes": len(self.gene_ids),
            "path": str(self.path),
        }

    def builder(self, store_attrs: dict) -> DatasetBuilder:
        return DatasetBuilder(self, store_attrs)

    ARRAYS = (("patches.zarr", ("image", "origin")), ("targets.zarr", ("counts", "library_size", "mask", "origin")))

    def verify(self) -> list[str]:
        """Read back every chunk of every array (presence, checksums); the problems found, one line each."""
        problems = []
        for store, names in self.ARRAYS:
            root = open_local(self.path / store)
            for sample in self.samples:
                if sample not in root:
                    problems.append(f"{store}/{sample}: group missing")
                    continue
                for name in names:
                    if name not in root[sample]:
                        problems.append(f"{store}/{sample}/{name}: array missing")
                        continue
                    arr = root[sample][name]
                    for key in missing_chunks(arr, self.path / store / sample / name):
                        problems.append(f"{store}/{sample}/{name}: chunk file {key} is missing")
                    problems += _read_back(arr, f"{store}/{sample}/{name}")
        return problems


@dataclass
class SampleArrays:
    """The arrays of one sample being written; prepare fills them."""

    image: zarr.Array
    counts: zarr.Array
    library_size: zarr.Array
    mask: zarr.Array


def _read_back(arr, label: str) -> list[str]:
    """Read every chunk along the patch axis; one line per chunk that fails its checksum or decompression."""
    k, out = arr.chunks[0], []
    for c in range(arr.cdata_shape[0]):
        try:
            arr[c * k : (c + 1) * k]
        except Exception as exc:  # noqa: BLE001 - checksum or decompression failure
            out.append(
                f"{label}: chunk {c} (patches {c * k}-{min((c + 1) * k, arr.shape[0]) - 1}) is corrupted "
                f"({type(exc).__name__}: {str(exc)[:60]})"
            )
    return out


class DatasetBuilder:
    """Writes a dataset in a hidden folder (:func:`~featcache.stores.files.staged_dir`); :meth:`commit` moves it
    into place, and leaving the ``with`` block without a commit removes it."""

    def __init__(self, dataset: Dataset, store_attrs: dict):
        self.dataset = dataset
        self.staged = staged_dir(dataset.path)
        self.partial = self.staged.path
        try:
            self.patches = open_local(self.partial / "patches.zarr", "w")
            self.targets = open_local(self.partial / "targets.zarr", "w")
            self.patches.attrs.update(store_attrs)
            self.targets.attrs.update(store_attrs)
        except BaseException:
            self.abort()  # a full disk while the skeleton is written leaves nothing behind
            raise

    def add_sample(self, sample: str, origins: np.ndarray, gene_ids, gene_labels, patch_attrs: dict) -> SampleArrays:
        n, b, px, g = len(origins), GEOMETRY.bins, GEOMETRY.patch_px, len(gene_ids)
        pg = self.patches.create_group(sample)
        pg.attrs.update(patch_attrs)
        image = create_array(
            pg,
            "image",
            shape=(n, px, px, 3),
            chunks=(IMAGE_CHUNK, px, px, 3),
            dtype="uint8",
            dims=("patch", "y", "x", "rgb"),
            level=3,
            attributes={"coordinates": "origin"},
        )
        write_origins(pg, origins)
        tg = self.targets.create_group(sample)
        tg.attrs.update({"sample": sample, "counts": "raw UMI counts of the gene panel per 8 µm bin"})
        write_strings(tg, "gene", gene_labels, "gene")
        write_strings(tg, "gene_id", gene_ids, "gene")
        write_origins(tg, origins)
        per_patch = dict(dims=("patch", "row", "col"), attributes={"coordinates": "origin"})
        counts = create_array(
            tg,
            "counts",
            shape=(n, g, b, b),
            chunks=(TARGET_CHUNK, g, b, b),
            dtype="int32",
            dims=("patch", "gene", "row", "col"),
            attributes={"coordinates": "gene_id origin"},
        )
        library = create_array(
            tg, "library_size", shape=(n, b, b), chunks=(TARGET_CHUNK, b, b), dtype="int32", **per_patch
        )
        mask = create_array(
            tg, "mask", shape=(n, b, b), chunks=(TARGET_CHUNK, b, b), dtype="bool", fill_value=False, **per_patch
        )
        return SampleArrays(image, counts, library, mask)

    def write_gene_totals(self, ids, samples: list[str], totals: np.ndarray, n_bins) -> None:
        """Each sample's total count per shared Gene Expression feature (to judge the panel rule per fold)."""
        np.savez_compressed(
            self.partial / "gene_totals.npz",
            ids=np.asarray(ids, dtype=str),
            samples=np.asarray(samples, dtype=str),
            totals=np.asarray(totals, np.float64),
            n_bins=np.asarray(n_bins, np.int64),
        )

    def write_qc(self, sample: str, png: bytes) -> Path:
        """The sample's QC picture, in the staged folder; returns where it will be once committed."""
        (self.partial / "qc").mkdir(exist_ok=True)
        (self.partial / "qc" / f"{sample}.png").write_bytes(png)
        return self.dataset.qc_path(sample)

    def commit(self, meta: dict) -> None:
        for store in ("patches.zarr", "targets.zarr"):
            consolidate(self.partial / store)
        write_json(self.partial / "dataset.json", meta)
        self.staged.commit()

    def abort(self) -> None:
        self.staged.abort()

    def __enter__(self) -> DatasetBuilder:
        return self

    def __exit__(self, *_) -> None:
        if not self.staged.done:
            self.abort()
