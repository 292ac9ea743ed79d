"""Per-bin values as AnnData (docs/design.md §7). This file is the layout; ``analysis export --run`` writes it
whole (:func:`bins_anndata`), ``featcache predict`` band by band (:class:`BinsH5adWriter`, so memory does not
grow with the slide).

::

    obs     one row per 8 µm bin, named <sample>_RRRRR_CCCCC (index "bin"): sample (categorical),
            array_row, array_col (int64), in_tissue (int8, 1 = in tissue)
    var     one row per gene of the panel (index "gene"): gene_id
    X       float32 (bin, gene)
    layers  float32 (bin, gene) by name: pred and truth (a run's export), z (a prediction, the run's target space)
    obsm    spatial float64 (bin, 2): (x, y) bin centres in full-resolution pixels
    uns     spatial/<sample>/{images, scalefactors, metadata} in scanpy's layout where an image is known;
            featcache: where the values come from
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache import spaceranger as sr
from featcache.geometry import BIN_UM


@dataclass
class BinRows:
    """Bins of one section, or one band of a section, in the layout's terms (one row per bin)."""

    sample: str
    coords: np.ndarray  # (n, 2) array (row, col)
    in_tissue: np.ndarray  # (n,) bool
    X: np.ndarray  # (n, genes)
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # each (n, genes)
    spatial: np.ndarray | None = None  # (n, 2) (x, y) full-resolution pixels; None: unknown (NaN)

    @classmethod
    def empty(cls, n_genes: int, layers=()) -> BinRows:
        none = np.zeros((0, n_genes), np.float32)
        return cls("", np.zeros((0, 2), np.int64), np.zeros(0, bool), none, {k: none for k in layers})


def bin_names(sample: str, coords: np.ndarray) -> np.ndarray:
    """``<sample>_RRRRR_CCCCC`` per bin (array row and column, as Space Ranger's barcodes number them)."""
    return np.array([f"{sample}_{r:05d}_{c:05d}" for r, c in np.asarray(coords)], dtype=object)


def spatial_uns(library: str, hires: np.ndarray, hires_scale: float, bin_px: float, source: str) -> dict:
    """``uns["spatial"]`` as scanpy reads it: the image scanpy draws on (``img_key="hires"``) and its scale."""
    scalefactors = {sr.TISSUE_HIRES_SCALEF: hires_scale, sr.SPOT_DIAMETER_FULLRES: bin_px, sr.BIN_SIZE_UM: BIN_UM}
    return {library: {"images": {"hires": hires}, "scalefactors": scalefactors, "metadata": {"source": source}}}


def _columns(parts: list[BinRows], samples: list[str]):
    """(obs, X, layers, spatial) of the parts, in the layout's names and dtypes."""
    import pandas as pd

    coords = np.concatenate([np.asarray(p.coords, np.int64).reshape(-1, 2) for p in parts])
    sample = np.concatenate([np.full(len(p.coords), p.sample, dtype=object) for p in parts])
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(sample, categories=samples),
            "array_row": coords[:, 0],
            "array_col": coords[:, 1],
            "in_tissue": np.concatenate([np.asarray(p.in_tissue).astype(np.int8) for p in parts]),
        },
        index=pd.Index(np.concatenate([bin_names(p.sample, p.coords) for p in parts]), dtype=object, name="bin"),
    )
    x = np.concatenate([np.asarray(p.X, np.float32) for p in parts])
    layers = {k: np.concatenate([np.asarray(p.layers[k], np.float32) for p in parts]) for k in parts[0].layers}
    spatial = np.concatenate(
        [np.full((len(p.coords), 2), np.nan) if p.spatial is None else np.asarray(p.spatial, np.float64) for p in parts]
    )
    return obs, x, layers, spatial


def _var(genes, gene_ids):
    import pandas as pd

    return pd.DataFrame({"gene_id": [str(g) for g in gene_ids]}, index=pd.Index([str(g) for g in genes], name="gene"))


def bins_anndata(parts, genes, gene_ids, uns: dict | None = None, samples=None, layers=()):
    """The parts as one AnnData (in memory); ``samples`` fixes the categories of ``obs["sample"]`` [default:
    the parts' samples in order], ``layers`` names the layers of an AnnData without parts."""
    import anndata as ad

    parts = list(parts)
    samples = list(dict.fromkeys(p.sample for p in parts)) if samples is None else list(samples)
    obs, x, by_name, spatial = _columns(parts or [BinRows.empty(len(genes), layers)], samples)
    return ad.AnnData(X=x, obs=obs, var=_var(genes, gene_ids), layers=by_name, obsm={"spatial": spatial}, uns=uns or {})


class BinsH5adWriter:
    """:func:`bins_anndata`'s layout written part by part into growing HDF5 datasets.

    anndata's own ``write_elem`` makes every element (from an AnnData without rows), so the file carries
    AnnData's encoding attributes and reads back as if written whole. ``with BinsH5adWriter(...) as h5:``,
    :meth:`append` each part, then :meth:`finish` with ``uns``.
    """

    def __init__(self, path, genes, gene_ids, samples, layers=()):
        import h5py
        from anndata.io import write_elem

        self.samples, self.n_obs, self.path, self.datasets = list(samples), 0, Path(path), {}
        empty = bins_anndata([], genes, gene_ids, samples=self.samples, layers=layers)
        self.file = f = h5py.File(path, "w")
        try:
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
            write_elem(f, "obs", empty.obs, dataset_kwargs={"maxshape": (None,), "chunks": True})
            write_elem(f, "var", empty.var)
            for key in ("layers", "obsm"):  # the groups first, so they carry AnnData's encoding attributes
                write_elem(f, key, {})
            matrices = [(f, "X", empty.X), *((f["layers"], k, v) for k, v in empty.layers.items())]
            for group, name, values in [*matrices, (f["obsm"], "spatial", empty.obsm["spatial"])]:
                width = values.shape[1]
                chunks = (max(1, min(4096, 2**20 // width)), width)
                write_elem(group, name, values, dataset_kwargs={"maxshape": (None, width), "chunks": chunks})
        except BaseException:
            self._discard()
            raise

    def append(self, part: BinRows) -> None:
        import pandas as pd

        obs, x, layers, spatial = _columns([part], self.samples)
        m, f = len(obs), self.file
        columns = {f"obs/{f['obs'].attrs['_index']}": obs.index.to_numpy(object), "X": x, "obsm/spatial": spatial}
        columns.update({f"layers/{k}": v for k, v in layers.items()})
        for name, col in obs.items():
            categorical = isinstance(col.dtype, pd.CategoricalDtype)
            columns[f"obs/{name}/codes" if categorical else f"obs/{name}"] = (
                col.cat.codes.to_numpy() if categorical else col.to_numpy()
            )
        for key, values in columns.items():
            ds = self.datasets.get(key)
            if ds is None:  # held open: HDF5 writes their chunks in flush(), which raises on a full disk
                ds = self.datasets[key] = f[key]
            ds.resize(self.n_obs + m, axis=0)
            ds[self.n_obs : self.n_obs + m] = values
        self._flush()
        self.n_obs += m

    def _flush(self) -> None:
        """Write what HDF5 holds back now, so that a full disk raises here (a dataset closed with unwritten chunks
        only warns, and HDF5 crashes on the next write)."""
        try:
            self.file.flush()
        except RuntimeError as exc:
            self._detach()
            code = errno.ENOSPC if "errno = 28" in str(exc) else errno.EIO
            raise OSError(code, str(exc).splitlines()[0][:200], str(self.path)) from None

    def finish(self, uns: dict) -> None:
        """The elements that do not grow: ``uns`` and the empty ``varm``, ``obsp``, ``varp``."""
        from anndata.io import write_elem

        write_elem(self.file, "uns", uns)
        for key in ("varm", "obsp", "varp"):
            write_elem(self.file, key, {})

    def __enter__(self) -> BinsH5adWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._flush()
        except OSError:
            self._discard()
            raise
        self.datasets.clear()
        self.file.close()

    def _detach(self) -> None:
        """Point the failed file's descriptor at /dev/null: HDF5 finishes closing it without writing (the caller
        removes the file)."""
        try:
            fd = self.file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
        except (OSError, ValueError, RuntimeError):
            return
        os.dup2(null, fd)
        os.close(null)

    def _discard(self) -> None:
        """Close a file whose writing failed, which the caller removes. On a full disk HDF5 cannot flush what it
        holds back, fails to close each object and then crashes: its writes go to /dev/null from here on."""
        self._detach()
        self.datasets.clear()
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - the file is thrown away; its own error is not the one to report
            pass
