"""Predictions for a slide: ``predictions/<run>/<slide>/`` (``featcache predict``). This file is its format.

::

    predictions.zarr   z (patch, gene, row, col) float16: the run's target space
                       expression: the same in log1p(CP10k) (log1p(counts) for runs trained on counts)
                       origin (patch, axis), in_tissue (patch, row, col), pxl_row/pxl_col (patch, row, col):
                       each bin's centre in full-resolution pixels
    predictions.h5ad   one observation per bin in the layout of featcache/stores/h5ad.py: X = expression,
                       layers["z"], obsm["spatial"] = (x, y) pixel centres, uns["spatial"] in scanpy's layout
    prediction.json    the run, the weights' identity, the slide, the lattice, the options
    figures/           one map per requested gene over the slide's thumbnail

A prediction is written in a hidden folder and moved into place only when complete (:class:`PredictionWriter`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.stores.files import StagedWriter, read_json, write_json
from featcache.stores.zarrio import consolidate, create_array, open_local, write_origins, write_strings

CHUNK = 16  # patches per stored chunk


class _Layout:
    """The names inside a prediction folder, below :attr:`root`: the folder, or a writer's hidden one."""

    root: Path

    @property
    def meta_path(self) -> Path:
        return self.root / "prediction.json"

    @property
    def zarr_path(self) -> Path:
        return self.root / "predictions.zarr"

    @property
    def h5ad_path(self) -> Path:
        return self.root / "predictions.h5ad"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"


class PredictionDir(_Layout):
    def __init__(self, path: Path):
        self.path = self.root = Path(path)

    def read_meta(self) -> dict | None:
        return read_json(self.meta_path)

    def claim(self, overwrite: bool) -> None:
        """Refuse an existing folder unless ``overwrite`` and it holds a featcache prediction."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if self.read_meta() is None:
            raise FeatcacheError(
                f"{self.path} exists and is not a featcache prediction; it is left as it is. Choose another --output."
            )
        if not overwrite:
            raise FeatcacheError(
                f"{self.path} already holds a prediction; pass --overwrite to replace it, or choose another --output."
            )

    def writer(self, n: int, genes, gene_ids, origins, attrs: dict) -> PredictionWriter:
        return PredictionWriter(self, n, genes, gene_ids, origins, attrs)


class PredictionWriter(StagedWriter, _Layout):
    """Writes the prediction folder batch by batch in a hidden folder (:class:`~featcache.stores.files.StagedWriter`,
    its paths those of :class:`PredictionDir`); :meth:`commit` moves it into place, and leaving the ``with`` block
    without a commit removes it."""

    def __init__(self, target: PredictionDir, n: int, genes, gene_ids, origins, attrs: dict):
        self.target = target
        super().__init__(target.path, True, lambda: self._create(n, genes, gene_ids, origins, attrs))
        self.root = self.partial

    def _create(self, n: int, genes, gene_ids, origins, attrs: dict) -> None:
        root = open_local(self.partial / "predictions.zarr", "w")
        root.attrs.update(attrs)
        g, b = len(genes), int(attrs.get("bins_per_patch", 32))
        per_bin = dict(dims=("patch", "row", "col"), attributes={"coordinates": "origin"})
        per_gene = dict(
            shape=(n, g, b, b),
            chunks=(CHUNK, g, b, b),
            dtype="float16",
            dims=("patch", "gene", "row", "col"),
            attributes={"coordinates": "origin gene_id"},
        )
        self.arrays = {
            "z": create_array(root, "z", **per_gene),
            "expression": create_array(root, "expression", **per_gene),
            "in_tissue": create_array(
                root, "in_tissue", shape=(n, b, b), chunks=(CHUNK, b, b), dtype="bool", fill_value=False, **per_bin
            ),
            "pxl_row": create_array(root, "pxl_row", shape=(n, b, b), chunks=(CHUNK, b, b), dtype="float32", **per_bin),
            "pxl_col": create_array(root, "pxl_col", shape=(n, b, b), chunks=(CHUNK, b, b), dtype="float32", **per_bin),
        }
        write_origins(root, origins)
        write_strings(root, "gene", genes, "gene")
        write_strings(root, "gene_id", gene_ids, "gene")

    def write(self, start: int, **blocks: np.ndarray) -> None:
        for name, values in blocks.items():
            self.arrays[name][start : start + len(values)] = values

    def _finish(self, meta: dict) -> None:
        consolidate(self.zarr_path)
        write_json(self.meta_path, meta)
