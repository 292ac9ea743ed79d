"""Reader for Space Ranger (3.x/4.x) Visium HD outputs at 8 µm (DESIGN §3).

What it reads, from ``outs/binned_outputs/square_008um/``:

* ``spatial/tissue_positions.parquet`` (or the older ``tissue_positions.csv``): every bin, with
  ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``;
* ``spatial/scalefactors_json.json``: ``microns_per_pixel``, ``bin_size_um``, ...;
* ``filtered_feature_bc_matrix.h5``: 10x HDF5 matrix, one column per in-tissue bin;
* the full-resolution H&E, found as ``*tissue_image.(btf|tif|tiff)`` next to ``outs/`` or given.

Everything is checked on opening, and each problem raises one :class:`FeatcacheError` that says
what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from featcache.errors import FeatcacheError
from featcache.geometry import BIN_UM as BIN_SIZE_UM

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
BIN_DIR = Path("binned_outputs") / "square_008um"
IMAGE_SUFFIXES = (".btf", ".tif", ".tiff")

# Positions are bin centres written as floats; a real grid fits an affine map to well under a
# pixel. Past a tenth of a bin the grid is not a lattice we can cut patches from.
MAX_AFFINE_RESIDUAL_BINS = 0.1
# µm/px, the spot diameter and the fitted lattice spacing must agree to this relative tolerance.
MPP_TOLERANCE = 0.02


# --------------------------------------------------------------------------- affine bin lattice
@dataclass(frozen=True)
class BinAffine:
    """Least-squares map (array_row, array_col, 1) -> (pxl_row, pxl_col) in full-res pixels."""

    matrix: np.ndarray  # shape (2, 3)
    rms_residual_px: float
    max_residual_px: float

    def to_pixels(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        m = self.matrix
        return m[0, 0] * rows + m[0, 1] * cols + m[0, 2], m[1, 0] * rows + m[1, 1] * cols + m[1, 2]

    @property
    def px_per_bin(self) -> float:
        """Lattice spacing in full-resolution pixels (geometric mean of the two axes)."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))

    @property
    def flipped(self) -> bool:
        return bool(np.linalg.det(self.matrix[:, :2]) < 0)

    def to_json(self) -> dict:
        return {
            "matrix": self.matrix.tolist(),
            "rms_residual_px": self.rms_residual_px,
            "max_residual_px": self.max_residual_px,
            "px_per_bin": self.px_per_bin,
            "rotation_deg": self.rotation_deg,
            "flipped": self.flipped,
        }


def fit_bin_affine(array_row, array_col, pxl_row, pxl_col) -> BinAffine:
    design = np.column_stack([np.asarray(array_row, float), np.asarray(array_col, float), np.ones(len(array_row))])
    target = np.column_stack([np.asarray(pxl_row, float), np.asarray(pxl_col, float)])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = np.linalg.norm(design @ coef - target, axis=1)
    return BinAffine(
        matrix=coef.T.copy(),
        rms_residual_px=float(np.sqrt(np.mean(resid**2))),
        max_residual_px=float(resid.max()),
    )


# --------------------------------------------------------------------------- count matrix
@dataclass
class CountMatrix:
    """A 10x feature-barcode matrix: ``counts`` is genes × bins (CSC, one column per bin)."""

    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray
    counts: sp.csc_matrix

    @property
    def library_size(self) -> np.ndarray:
        return np.asarray(self.counts.sum(axis=0)).ravel()


def _strings(ds) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


def read_matrix_h5(path: Path) -> CountMatrix:
    """Read a 10x HDF5 feature-barcode matrix (``/matrix`` group, column-per-bin CSC)."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(
            f"count matrix not found: {path}. Point --sample at a Space Ranger outs/ folder that "
            "holds binned_outputs/square_008um/filtered_feature_bc_matrix.h5."
        )
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise FeatcacheError(
                    f"{path} has no /matrix group: it is not a 10x feature-barcode matrix "
                    "(expected Space Ranger's filtered_feature_bc_matrix.h5)."
                )
            g = f["matrix"]
            missing = [k for k in ("barcodes", "data", "indices", "indptr", "shape", "features") if k not in g]
            if missing:
                raise FeatcacheError(
                    f"{path}: /matrix lacks {', '.join(missing)}; the file is not a complete 10x matrix."
                )
            n_genes, n_bins = (int(v) for v in g["shape"][()])
            data = g["data"][()]
            indices = g["indices"][()]
            indptr = g["indptr"][()]
            barcodes = _strings(g["barcodes"])
            feat = g["features"]
            ids = _strings(feat["id"])
            names = _strings(feat["name"])
            types = (
                _strings(feat["feature_type"])
                if "feature_type" in feat
                else np.full(len(ids), "Gene Expression", object)
            )
    except OSError as exc:
        raise FeatcacheError(f"cannot read {path} as HDF5 ({exc}); the file may be truncated or not HDF5.") from exc
    if len(barcodes) != n_bins or len(ids) != n_genes or len(indptr) != n_bins + 1:
        raise FeatcacheError(
            f"{path}: /matrix/shape says {n_genes} genes × {n_bins} bins but holds {len(ids)} features, "
            f"{len(barcodes)} barcodes and {len(indptr) - 1} columns; the file is inconsistent."
        )
    counts = sp.csc_matrix((data, indices, indptr), shape=(n_genes, n_bins))
    return CountMatrix(barcodes, ids, names, types, counts)


# --------------------------------------------------------------------------- positions
def read_positions(spatial_dir: Path) -> pd.DataFrame:
    parquet = spatial_dir / "tissue_positions.parquet"
    csv = spatial_dir / "tissue_positions.csv"
    if parquet.is_file():
        path, df = parquet, pd.read_parquet(parquet)
    elif csv.is_file():
        path, df = csv, pd.read_csv(csv)
        if (
            list(df.columns) != POSITION_COLUMNS
            and len(df.columns) == 6
            and not set(POSITION_COLUMNS) & set(df.columns)
        ):
            df = pd.read_csv(csv, header=None, names=POSITION_COLUMNS)  # headerless older file
    else:
        raise FeatcacheError(
            f"no tissue_positions.parquet (or .csv) in {spatial_dir}. Point --sample at a Space Ranger "
            "outs/ folder with binned_outputs/square_008um/spatial/."
        )
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise FeatcacheError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))}); "
            f"a Space Ranger positions file has {', '.join(POSITION_COLUMNS)}."
        )
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    for col in ("in_tissue", "array_row", "array_col"):
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise FeatcacheError(f"{path}: column {col} is not numeric; the positions file is malformed.")
    if df["barcode"].duplicated().any():
        dup = df["barcode"][df["barcode"].duplicated()].iloc[0]
        raise FeatcacheError(f"{path}: barcode {dup} appears more than once; each bin must be listed once.")
    if (df["array_row"] < 0).any() or (df["array_col"] < 0).any():
        raise FeatcacheError(f"{path}: negative array_row/array_col; the positions file is malformed.")
    df["in_tissue"] = df["in_tissue"].astype(bool)
    df["array_row"] = df["array_row"].astype(np.int64)
    df["array_col"] = df["array_col"].astype(np.int64)
    return df


# --------------------------------------------------------------------------- locating files
def find_bin_dir(path: Path) -> Path:
    """Accept a sample folder holding outs/, an outs/ folder, or square_008um/ itself."""
    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"sample folder not found: {path}")
    for cand in (path, path / BIN_DIR, path / "outs" / BIN_DIR):
        if (cand / "spatial").is_dir() and cand.name.startswith("square_"):
            if cand.name != "square_008um":
                raise FeatcacheError(f"{cand} holds {cand.name} bins; featcache works on 8 µm bins. Use square_008um.")
            return cand
    raise FeatcacheError(
        f"{path} is not a Space Ranger Visium HD output: expected outs/{BIN_DIR}/spatial/ under it. "
        "Point --sample NAME=DIR at the folder holding outs/ (or outs/ itself)."
    )


def find_image(bin_dir: Path) -> Path:
    """The full-resolution H&E: ``*tissue_image.(btf|tif|tiff)`` next to outs/ or inside it."""
    outs = bin_dir.parent.parent
    found: list[Path] = []
    for folder in (outs.parent, outs):
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.stem.lower().endswith("tissue_image"):
                found.append(p)
    if not found:
        raise FeatcacheError(
            f"no full-resolution H&E (*tissue_image.btf/.tif/.tiff) next to {outs}. Pass it with --image NAME=FILE."
        )
    if len(found) > 1:
        raise FeatcacheError(
            f"several candidate H&E images next to {outs}: {', '.join(p.name for p in found)}. "
            "Choose one with --image NAME=FILE."
        )
    return found[0]


# --------------------------------------------------------------------------- one sample
@dataclass
class VisiumHDSample:
    """One Visium HD sample at 8 µm, checked and ready to cut into patches."""

    name: str
    bin_dir: Path
    image_path: Path
    positions: pd.DataFrame
    scalefactors: dict
    affine: BinAffine
    image_shape: tuple[int, int]
    _matrix: CountMatrix | None = field(default=None, repr=False)

    @property
    def matrix_path(self) -> Path:
        return self.bin_dir / "filtered_feature_bc_matrix.h5"

    @property
    def microns_per_pixel(self) -> float:
        return float(self.scalefactors["microns_per_pixel"])

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.positions["array_row"].max()) + 1, int(self.positions["array_col"].max()) + 1

    @property
    def matrix(self) -> CountMatrix:
        if self._matrix is None:
            self._matrix = read_matrix_h5(self.matrix_path)
            self._check_matrix(self._matrix)
        return self._matrix

    def _check_matrix(self, m: CountMatrix) -> None:
        known = pd.Index(self.positions["barcode"])
        absent = ~pd.Index(m.barcodes).isin(known)
        if absent.any():
            examples = ", ".join(map(str, m.barcodes[absent][:3]))
            raise FeatcacheError(
                f"sample {self.name}: {int(absent.sum())} barcode(s) in {self.matrix_path.name} are not in "
                f"the positions file (e.g. {examples}). The matrix and positions come from different runs "
                "or bin sizes; use the files of one Space Ranger output."
            )

    def grid_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(in_tissue grid, matrix column index grid with -1 where the bin has no column)."""
        rows, cols = self.grid_shape
        pos = self.positions
        in_tissue = np.zeros((rows, cols), dtype=bool)
        in_tissue[pos["array_row"].to_numpy(), pos["array_col"].to_numpy()] = pos["in_tissue"].to_numpy()
        column = np.full((rows, cols), -1, dtype=np.int64)
        where = pd.Index(self.matrix.barcodes).get_indexer(pos["barcode"])
        has = where >= 0
        column[pos["array_row"].to_numpy()[has], pos["array_col"].to_numpy()[has]] = where[has]
        return in_tissue, column


def _read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        raise FeatcacheError(f"{path} not found; the Space Ranger spatial/ folder is incomplete.")
    try:
        sf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FeatcacheError(f"{path} is not valid JSON ({exc}).") from exc
    if "microns_per_pixel" not in sf:
        raise FeatcacheError(
            f"{path} has no microns_per_pixel; featcache takes the image scale from it "
            "(never from the TIFF tag). Use a Space Ranger 3.x/4.x output."
        )
    return sf


def open_sample(name: str, path: str | Path, image: str | Path | None = None) -> VisiumHDSample:
    """Open and check one sample. The count matrix is read (and checked) on first use."""
    from featcache.slide import Slide  # local: slide imports heavy optional bits lazily

    bin_dir = find_bin_dir(Path(path))
    spatial = bin_dir / "spatial"
    sf = _read_scalefactors(spatial)
    positions = read_positions(spatial)
    if not (bin_dir / "filtered_feature_bc_matrix.h5").is_file():
        raise FeatcacheError(
            f"{bin_dir / 'filtered_feature_bc_matrix.h5'} not found; the Space Ranger output is incomplete."
        )
    image_path = Path(image) if image else find_image(bin_dir)
    if not image_path.is_file():
        raise FeatcacheError(f"image for sample {name} not found: {image_path}")

    affine = fit_bin_affine(
        positions["array_row"],
        positions["array_col"],
        positions["pxl_row_in_fullres"],
        positions["pxl_col_in_fullres"],
    )
    src = spatial / "tissue_positions.parquet"
    if affine.max_residual_px > MAX_AFFINE_RESIDUAL_BINS * affine.px_per_bin:
        raise FeatcacheError(
            f"sample {name}: bin positions are not an affine lattice (worst bin is "
            f"{affine.max_residual_px:.1f} px = {affine.max_residual_px / max(affine.px_per_bin, 1e-9):.2f} bins "
            f"off the least-squares fit of {src.parent}). The positions file is corrupt or edited."
        )
    mpp = float(sf["microns_per_pixel"])
    bin_um = float(sf.get("bin_size_um", BIN_SIZE_UM))
    if abs(bin_um - BIN_SIZE_UM) > 1e-6:
        raise FeatcacheError(f"sample {name}: scalefactors say bin_size_um={bin_um}; featcache needs the 8 µm bins.")
    lattice_um = affine.px_per_bin * mpp
    problems = []
    if abs(lattice_um - BIN_SIZE_UM) > MPP_TOLERANCE * BIN_SIZE_UM:
        problems.append(
            f"bin centres are {affine.px_per_bin:.2f} px apart, which at microns_per_pixel={mpp} is "
            f"{lattice_um:.2f} µm, not {BIN_SIZE_UM:g} µm"
        )
    if "spot_diameter_fullres" in sf:
        spot_um = float(sf["spot_diameter_fullres"]) * mpp
        if abs(spot_um - bin_um) > MPP_TOLERANCE * bin_um:
            problems.append(f"spot_diameter_fullres × microns_per_pixel = {spot_um:.2f} µm, not {bin_um:g} µm")
    if problems:
        raise FeatcacheError(
            f"sample {name}: inconsistent µm/px in {spatial / 'scalefactors_json.json'}: "
            + "; ".join(problems)
            + ". The positions and scale factors must describe the same full-resolution image."
        )

    with Slide(image_path) as slide:
        height, width = slide.shape
    tissue = positions[positions["in_tissue"]]
    if len(tissue) == 0:
        raise FeatcacheError(f"sample {name}: no bin is marked in_tissue in the positions file.")
    half = affine.px_per_bin / 2
    need_r = float(tissue["pxl_row_in_fullres"].max() + half)
    need_c = float(tissue["pxl_col_in_fullres"].max() + half)
    low_r = float(tissue["pxl_row_in_fullres"].min() - half)
    low_c = float(tissue["pxl_col_in_fullres"].min() - half)
    if need_r > height or need_c > width or low_r < 0 or low_c < 0:
        raise FeatcacheError(
            f"sample {name}: image {image_path.name} is {height} × {width} px but the in-tissue bins reach "
            f"rows {low_r:.0f}..{need_r:.0f}, cols {low_c:.0f}..{need_c:.0f}. Is it the full-resolution "
            "image of this sample (not a downscaled or cropped copy)?"
        )
    return VisiumHDSample(name, bin_dir, image_path, positions, sf, affine, (height, width))
