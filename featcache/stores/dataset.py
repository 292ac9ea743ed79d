"""The prepared dataset: ``datasets/<dataset>/`` (docs/design.md §7). This file is its format.

::

    patches.zarr/<sample>/image         uint8 (patch, y, x, rgb)   448 × 448 × 3 per patch (14 px per bin)
    patches.zarr/<sample>/image_16px    uint8 (patch, y, x, rgb)   512 × 512 × 3 (16 px per bin), when asked for
    patches.zarr/<sample>/origin        int32 (patch, axis)        array (row, col) of the patch's bin (0, 0)
    targets.zarr/<sample>/counts        int32 (patch, gene, row, col)  raw UMI counts of the gene panel
    targets.zarr/<sample>/library_size  int32 (patch, row, col)   Gene Expression UMIs of the bin
    targets.zarr/<sample>/mask          bool  (patch, row, col)   bin is in tissue (and in the matrix)
    targets.zarr/<sample>/{gene, gene_id, origin}                 coordinates
    dataset.json                        samples, gene panel, geometry, renderings held, source fingerprints
    qc/<sample>.png                     the slide, its in-tissue bins and the kept patches through the registration

A dataset is built in a hidden folder beside its final place (:class:`DatasetBuilder`) and moved
there only when complete, so an interrupted run never leaves a half-written dataset that looks
finished.

Every rendering of the patches is one array of the same origins and chunking: ``image`` at 14 px per
bin (always), ``image_16px`` at 16 (``prepare --px-per-bin 14,16``, for patch-16 encoders); each is
resampled from the full-resolution slide through the same per-patch bin map. ``dataset.json``'s
``renderings`` lists the ones the dataset holds (a dataset without the key holds ``image`` alone). A
rendering added to a finished dataset (:class:`RenderingAdder`) is written in a hidden folder, moved
into ``patches.zarr`` whole and listed in ``dataset.json`` last: only a listed rendering exists for
readers. Adding one changes nothing else (targets, other arrays, fingerprint).
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, RENDERINGS, geometry_for, image_array_name
from featcache.stores.files import StagedWriter, read_json, staged_dir, write_json
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


IMAGE_ARRAYS = tuple(image_array_name(p) for p in RENDERINGS)  # every rendering's array name


def open_lazy(path: Path, group: str | None, drop: list[str] | None = None) -> xr.Dataset:
    """A Zarr group as a lazily loaded (Dask-backed) xarray Dataset (without the variables in ``drop``)."""
    return xr.open_zarr(path, group=group, consolidated=False, drop_variables=drop)


def rendering_record(px_per_bin: int) -> dict:
    """What dataset.json's ``renderings`` says of one rendering."""
    g = geometry_for(px_per_bin)
    return {
        "px_per_bin": g.px_per_bin,
        "patch_px": g.patch_px,
        "um_per_px": g.um_per_px,
        "array": image_array_name(px_per_bin),
    }


def _store_of(name: str) -> str:
    return "patches.zarr" if name in IMAGE_ARRAYS else "targets.zarr"


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

    @property
    def renderings(self) -> list[int]:
        """Pixels per bin of the renderings the dataset holds (14: ``image``; 16: ``image_16px``)."""
        held = [int(r["px_per_bin"]) for r in self.meta.get("renderings", [])]
        return sorted(held) or [GEOMETRY.px_per_bin]

    def has_rendering(self, px_per_bin: int) -> bool:
        return px_per_bin in self.renderings

    def image_name(self, px_per_bin: int = GEOMETRY.px_per_bin, reader: str | None = None) -> str:
        """The patches.zarr array of the rendering at ``px_per_bin``; refused, with the command that adds it,
        when the dataset does not hold it (``reader`` says who wanted it, for the message)."""
        name = image_array_name(geometry_for(px_per_bin).px_per_bin)
        if not self.has_rendering(px_per_bin):
            wanted = sorted({*self.renderings, px_per_bin})
            raise FeatcacheError(
                f"dataset {self.name!r} has no {px_per_bin} px per bin rendering (patches.zarr/<sample>/{name}, "
                f"{geometry_for(px_per_bin).patch_px} px patches){f', which {reader} reads' if reader else ''}; it holds "
                f"{', '.join(map(str, self.renderings))} px per bin. Add it with `{self.prepare_command(wanted)}` "
                "(the same inputs: only the missing rendering is made, from the full-resolution slides; the targets, "
                "the other renderings and the dataset's fingerprint stay as they are)."
            )
        return name

    def prepare_command(self, px_per_bin=None) -> str:
        """The ``featcache prepare`` command that made this dataset (its samples, images, patients, panel and
        patching from dataset.json), with ``--px-per-bin`` when renderings beyond 14 px are asked for."""
        meta, q = self.meta, shlex.quote
        parts = ["featcache prepare", f"--dataset {q(self.name)}", f"--workspace {q(str(self.path.parent.parent))}"]
        for s, info in meta["samples"].items():
            parts.append("--sample " + q(s + "=" + str(info.get("source", "DIR"))))
            if info.get("image"):
                parts.append("--image " + q(s + "=" + str(info["image"])))
            if info.get("patient", s) != s:
                parts.append("--patient " + q(s + "=" + str(info["patient"])))
        geometry = meta.get("geometry", {})
        parts += [
            f"--genes {q(str(meta['genes'].get('spec', 'top-mean:50')))}",
            f"--stride {geometry.get('stride_bins', GEOMETRY.bins)}",
            f"--min-tissue {geometry.get('min_tissue', 0.5)}",
        ]
        wanted = sorted(set(px_per_bin or self.renderings))
        if wanted != [GEOMETRY.px_per_bin]:
            parts.append(f"--px-per-bin {','.join(map(str, wanted))}")
        return " ".join(parts)

    def patches(self, sample: str, px_per_bin: int = GEOMETRY.px_per_bin) -> xr.Dataset:
        """One sample's image patches at ``px_per_bin`` as a lazy (Dask-backed) xarray.Dataset: ``image`` uint8
        (patch, y, x, rgb), 448 × 448 × 3 each at 14 px per bin (``image_16px``, 512 × 512 × 3, at 16), with
        ``origin`` (patch, axis), the array (row, col) of each patch's bin (0, 0). One rendering at a time: their
        y and x have different lengths."""
        self._check_sample(sample)
        name = self.image_name(px_per_bin)
        return open_lazy(self.patches_path, sample, [n for n in IMAGE_ARRAYS if n != name])

    def images(self, sample: str, px_per_bin: int = GEOMETRY.px_per_bin) -> xr.DataArray:
        """One sample's patches at ``px_per_bin`` px per bin: uint8 (patch, y, x, rgb), lazily."""
        return self.patches(sample, px_per_bin)[image_array_name(px_per_bin)]

    def targets(self, sample: str) -> xr.Dataset:
        """One sample's per-bin targets as a lazy (Dask-backed) xarray.Dataset: ``counts`` int32 (patch, gene, row,
        col) raw UMIs of the panel genes (``gene`` and ``gene_id`` coordinates), ``library_size`` int32 (patch, row,
        col) UMIs of all genes, ``mask`` bool (patch, row, col) in-tissue bins, and ``origin``."""
        self._check_sample(sample)
        return open_lazy(self.targets_path, sample)

    def image_array(self, sample: str, px_per_bin: int = GEOMETRY.px_per_bin) -> zarr.Array:
        """The raw Zarr array of a sample's patches at ``px_per_bin`` (for readers that decode chunk by chunk)."""
        self._check_sample(sample)
        return open_local(self.patches_path)[sample][self.image_name(px_per_bin)]

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
            store = _store_of(name)
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
        store = _store_of(name)
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
            "px_per_bin": self.renderings,
            "path": str(self.path),
        }

    def builder(self, store_attrs: dict, replace: bool = False) -> DatasetBuilder:
        """A staged build of this dataset; ``replace`` (``--overwrite``) lets it replace one already in place."""
        return DatasetBuilder(self, store_attrs, replace)

    ARRAYS = (("patches.zarr", ("image", "origin")), ("targets.zarr", ("counts", "library_size", "mask", "origin")))

    def arrays(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(store, array names) of everything the dataset holds: :attr:`ARRAYS` and every other rendering."""
        (patches, names), targets = self.ARRAYS
        extra = tuple(image_array_name(p) for p in self.renderings if p != GEOMETRY.px_per_bin)
        return (patches, names + extra), targets

    def verify(self) -> list[str]:
        """Read back every chunk of every array (presence, checksums); the problems found, one line each."""
        problems = []
        for store, names in self.arrays():
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
    images: dict[int, zarr.Array] = field(default_factory=dict)  # px per bin -> its rendering (``image`` at 14)


def _create_image(group: zarr.Group, px_per_bin: int, n: int) -> zarr.Array:
    """One rendering's array: (patch, y, x, rgb) uint8, IMAGE_CHUNK whole patches per chunk, origins as coordinate."""
    px = geometry_for(px_per_bin).patch_px
    return create_array(
        group,
        image_array_name(px_per_bin),
        shape=(n, px, px, 3),
        chunks=(IMAGE_CHUNK, px, px, 3),
        dtype="uint8",
        dims=("patch", "y", "x", "rgb"),
        level=3,
        attributes={"coordinates": "origin", "px_per_bin": px_per_bin},
    )


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


class DatasetBuilder(StagedWriter):
    """Writes a dataset in a hidden folder (:class:`~featcache.stores.files.StagedWriter`); :meth:`commit` moves
    it into place, and leaving the ``with`` block without a commit removes it."""

    def __init__(self, dataset: Dataset, store_attrs: dict, replace: bool = False):
        self.dataset = dataset
        super().__init__(dataset.path, replace, lambda: self._create(store_attrs))

    def _create(self, store_attrs: dict) -> None:
        self.patches = open_local(self.partial / "patches.zarr", "w")
        self.targets = open_local(self.partial / "targets.zarr", "w")
        self.patches.attrs.update(store_attrs)
        self.targets.attrs.update(store_attrs)

    def add_sample(
        self, sample: str, origins: np.ndarray, gene_ids, gene_labels, patch_attrs: dict, renderings=(14,)
    ) -> SampleArrays:
        """The sample's arrays, empty: one image array per rendering (px per bin; 14 always), targets, origins."""
        n, b, g = len(origins), GEOMETRY.bins, len(gene_ids)
        pg = self.patches.create_group(sample)
        pg.attrs.update(patch_attrs)
        images = {p: _create_image(pg, p, n) for p in sorted({GEOMETRY.px_per_bin, *renderings})}
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
        return SampleArrays(images[GEOMETRY.px_per_bin], counts, library, mask, images)

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

    def _finish(self, meta: dict) -> None:
        for store in ("patches.zarr", "targets.zarr"):
            consolidate(self.partial / store)
        write_json(self.partial / "dataset.json", meta)


class RenderingAdder:
    """Adds renderings to a finished dataset without touching anything else in it.

    The new arrays are written in a hidden folder beside the dataset (:func:`staged_dir`: a killed writer's is
    removed by the next); :meth:`commit` moves each into ``patches.zarr/<sample>/`` whole, consolidates the
    store's metadata and only then lists the renderings in ``dataset.json`` (one atomic write): until that
    write the dataset holds what it held before, and an array left by an interrupted commit, never listed, is
    replaced by the next. Leaving the ``with`` block without a commit removes the hidden folder.
    """

    def __init__(self, dataset: Dataset, renderings):
        self.dataset = dataset
        self.renderings = sorted(set(renderings))
        self.staged = staged_dir(dataset.path)
        self.partial = self.staged.path
        self.samples: list[str] = []
        try:
            self.patches = open_local(self.partial / "patches.zarr", "w")
        except BaseException:
            self.staged.abort()
            raise

    def add_sample(self, sample: str, n: int) -> dict[int, zarr.Array]:
        """Empty arrays of the sample's new renderings (``n`` patches, the sample's origins)."""
        group = self.patches.create_group(sample)
        self.samples.append(sample)
        return {p: _create_image(group, p, n) for p in self.renderings}

    def commit(self) -> list[int]:
        """Move the arrays into place and list them in dataset.json; returns the renderings added (those another
        process listed meanwhile are left as that process wrote them)."""
        ds = self.dataset
        meta = read_json(ds.meta_path)
        held = {int(r["px_per_bin"]) for r in meta.get("renderings", [])} or {GEOMETRY.px_per_bin}
        new = [p for p in self.renderings if p not in held]
        for p in new:
            name = image_array_name(p)
            for sample in self.samples:
                src, dst = self.partial / "patches.zarr" / sample / name, ds.patches_path / sample / name
                if dst.exists():  # left by an interrupted commit: never listed in dataset.json, so never read
                    shutil.rmtree(dst)
                os.replace(src, dst)
        if new:
            consolidate(ds.patches_path)
            meta["renderings"] = [rendering_record(p) for p in sorted(held | set(new))]
            write_json(ds.meta_path, meta)
        self.staged.abort()  # what is left of the hidden folder
        ds.__dict__.pop("meta", None)  # the cached dataset.json is stale
        return new

    def __enter__(self) -> RenderingAdder:
        return self

    def __exit__(self, *_) -> None:
        if not self.staged.done:
            self.staged.abort()
