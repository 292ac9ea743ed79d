"""Reader for Space Ranger (3.x/4.x) Visium HD outputs at 8 µm (docs/design.md §3).

What it reads, from ``outs/binned_outputs/square_008um/`` (``segmented_outputs/`` beside it, in
Space Ranger 4, is ignored):

* ``spatial/tissue_positions.parquet`` (or the older ``tissue_positions.csv``): every bin, with
  ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``;
* ``spatial/scalefactors_json.json``: ``microns_per_pixel`` (older deposits lack it; then, as
  Space Ranger does, ``bin_size_um / spot_diameter_fullres``), ``bin_size_um``, ...;
* ``filtered_feature_bc_matrix.h5``: 10x HDF5 matrix, one column per in-tissue bin, read in
  blocks of bins (a real 8 µm matrix has ~10⁸ non-zeros and is never held whole). Only
  ``Gene Expression`` features count; others (e.g. ``Antibody Capture``) are counted per type;
* the full-resolution microscope image: ``*tissue_image.*`` found next to ``outs/`` (or above
  the bin folder), or given.

Everything is checked on opening, and each problem raises one :class:`FeatcacheError` that says
what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from featcache import spaceranger as sr
from featcache.errors import FeatcacheError
from featcache.geometry import BIN_UM, GEOMETRY, patch_origins
from featcache.registration import Registration, register
from featcache.spaceranger import BIN_DIR, GENE_EXPRESSION, NOT_MICROSCOPE, POSITION_COLUMNS

IMAGE_SUFFIXES = (".btf", ".tif", ".tiff", ".svs", ".jpg", ".jpeg", ".png")
MPP_TOLERANCE = 0.01  # µm/px against the fitted bin pitch, and against the spot diameter
MAX_UPSAMPLING = 1.25  # the image needs ≥ p / 1.25 native px per 8 µm bin for the finest rendering p asked for
# (11.2 for the 14 px rendering, 12.8 for the 16 px one)
BLOCK_NNZ = 1_000_000  # non-zeros read per block of bins (~30 MB of temporaries)


# --------------------------------------------------------------------------- count matrix
def _strings(ds) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


class MatrixH5:
    """A 10x HDF5 feature-barcode matrix (``/matrix``, column per bin), read in blocks of bins."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatcacheError(
                f"count matrix not found: {self.path}. Point --sample at a Space Ranger outs/ folder that "
                f"holds {BIN_DIR.as_posix()}/{sr.FILTERED_MATRIX}."
            )
        try:
            with h5py.File(self.path, "r") as f:
                self._read_header(f)
        except OSError as exc:
            raise FeatcacheError(
                f"cannot read {self.path} as HDF5 ({exc}); the file may be truncated or not HDF5."
            ) from None

    def _read_header(self, f) -> None:
        if sr.MATRIX not in f:
            raise FeatcacheError(
                f"{self.path} has no /{sr.MATRIX} group: it is not a 10x feature-barcode matrix "
                f"(expected Space Ranger's {sr.FILTERED_MATRIX})."
            )
        g = f[sr.MATRIX]
        missing = [k for k in sr.MATRIX_DATASETS if k not in g]
        if missing:
            raise FeatcacheError(
                f"{self.path}: /matrix lacks {', '.join(missing)}; the file is not a complete 10x matrix."
            )
        self.n_features, self.n_bins = (int(v) for v in g[sr.SHAPE][()])
        self.barcodes = as_bytes(g[sr.BARCODES][()])  # fixed-width bytes, as stored
        feat = g[sr.FEATURES]
        self.feature_ids = _strings(feat[sr.FEATURE_ID])
        self.feature_names = _strings(feat[sr.FEATURE_NAME])
        n = len(self.feature_ids)
        self.feature_types = (
            _strings(feat[sr.FEATURE_TYPE]) if sr.FEATURE_TYPE in feat else np.full(n, GENE_EXPRESSION, object)
        )
        self.indptr = g[sr.INDPTR][()].astype(np.int64)
        self.nnz = int(g[sr.DATA].shape[0])
        version = f.attrs.get(sr.ATTR_SOFTWARE_VERSION, b"")
        self.software_version = version.decode() if isinstance(version, bytes) else str(version)
        if len(self.barcodes) != self.n_bins or n != self.n_features or len(self.indptr) != self.n_bins + 1:
            raise FeatcacheError(
                f"{self.path}: /matrix/shape says {self.n_features} features × {self.n_bins} bins but holds {n} "
                f"features, {len(self.barcodes)} barcodes and {len(self.indptr) - 1} columns; the file is inconsistent."
            )
        if self.indptr[-1] != self.nnz or np.any(np.diff(self.indptr) < 0):
            raise FeatcacheError(f"{self.path}: /matrix/indptr does not match its data; the file is damaged.")

    @property
    def gene_expression(self) -> np.ndarray:
        """Boolean mask of the Gene Expression features."""
        return self.feature_types == GENE_EXPRESSION

    def feature_type_counts(self) -> dict[str, int]:
        types, counts = np.unique(self.feature_types.astype(str), return_counts=True)
        return {str(t): int(c) for t, c in zip(types, counts)}

    def blocks(self):
        """(first bin, last bin + 1, column index per non-zero, feature index per non-zero, counts)."""
        try:
            with h5py.File(self.path, "r") as f:
                data, indices = f[sr.MATRIX][sr.DATA], f[sr.MATRIX][sr.INDICES]
                c0 = 0
                while c0 < self.n_bins:
                    c1 = int(np.searchsorted(self.indptr, self.indptr[c0] + BLOCK_NNZ, side="right")) - 1
                    c1 = min(max(c1, c0 + 1), self.n_bins)
                    a, b = self.indptr[c0], self.indptr[c1]
                    cols = np.repeat(np.arange(c1 - c0, dtype=np.int64), np.diff(self.indptr[c0 : c1 + 1]))
                    yield c0, c1, cols, indices[a:b].astype(np.int64), data[a:b]
                    c0 = c1
        except OSError as exc:
            raise FeatcacheError(
                f"cannot read the counts of {self.path} ({exc}); the file is truncated or damaged."
            ) from None

    def scan(self) -> tuple[np.ndarray, np.ndarray]:
        """One pass: total counts per feature, and each bin's library size (its Gene Expression UMIs)."""
        per_feature = np.zeros(self.n_features, np.float64)
        library = np.zeros(self.n_bins, np.int64)
        ge = self.gene_expression
        for c0, c1, cols, idx, val in self.blocks():
            if len(idx) and (idx.min() < 0 or idx.max() >= self.n_features):
                raise FeatcacheError(
                    f"{self.path}: a feature index lies outside the feature list; the file is damaged."
                )
            per_feature += np.bincount(idx, weights=val, minlength=self.n_features)
            keep = ge[idx]
            library[c0:c1] = np.bincount(cols[keep], weights=val[keep], minlength=c1 - c0)
        return per_feature, library

    def gather(self, features: np.ndarray) -> np.ndarray:
        """Dense counts (bins × len(features)) of the given feature indices, one pass over the matrix."""
        lookup = np.full(self.n_features, -1, np.int64)
        lookup[np.asarray(features, np.int64)] = np.arange(len(features))
        out = np.zeros((self.n_bins, len(features)), np.int32)
        for c0, _, cols, idx, val in self.blocks():
            j = lookup[idx]
            keep = j >= 0
            out[c0 + cols[keep], j[keep]] = val[keep]
        return out


@dataclass
class Positions:
    """Every bin of a sample, column by column: barcodes as fixed-width bytes (a real sample's 550,000 bins take
    12 MB, not the 300 MB of Python strings), the rest as numpy arrays."""

    barcode: np.ndarray  # |S (bytes)
    in_tissue: np.ndarray  # bool
    array_row: np.ndarray  # int64
    array_col: np.ndarray  # int64
    pxl_row_in_fullres: np.ndarray  # float64
    pxl_col_in_fullres: np.ndarray  # float64

    def __getitem__(self, column: str) -> np.ndarray:
        return getattr(self, column)

    def __len__(self) -> int:
        return len(self.barcode)


def read_positions(spatial_dir: Path) -> Positions:
    """Every bin of the sample: ``barcode, in_tissue, array_row, array_col, pxl_row/col_in_fullres``, checked."""
    parquet = spatial_dir / sr.POSITIONS_PARQUET
    csv = spatial_dir / sr.POSITIONS_CSV
    if parquet.is_file():
        path, columns = parquet, _read_table(parquet, _parquet_columns)
    elif csv.is_file():
        path, columns = csv, _read_table(csv, _csv_columns)
    else:
        raise FeatcacheError(
            f"no {sr.POSITIONS_PARQUET} (or .csv) in {spatial_dir}. Point --sample at a Space Ranger "
            f"{sr.OUTS}/ folder with {BIN_DIR.as_posix()}/{sr.SPATIAL}/."
        )
    missing = [c for c in POSITION_COLUMNS if c not in columns]
    if missing:
        raise FeatcacheError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, columns))}); "
            f"a Space Ranger positions file has {', '.join(POSITION_COLUMNS)}."
        )
    barcode = columns[sr.BARCODE]
    if len(barcode) == 0:
        raise FeatcacheError(f"{path} lists no bins; the positions file is empty or truncated.")
    numbers = {}
    for col in POSITION_COLUMNS[1:]:
        v = np.asarray(columns[col])
        if v.dtype.kind not in "biuf" or (v.dtype.kind == "b" and col != sr.IN_TISSUE):
            raise FeatcacheError(f"{path}: column {col} is not numeric; the positions file is malformed.")
        numbers[col] = v
    bad = ~np.all([np.isfinite(v.astype(np.float64)) for v in numbers.values()], axis=0)
    if bad.any():
        raise FeatcacheError(
            f"{path}: {int(bad.sum())} bin(s) have a missing or non-finite position (e.g. "
            f"{barcode[bad][0].decode(errors='replace')}); the positions file is damaged."
        )
    pos = Positions(
        barcode,
        numbers[sr.IN_TISSUE].astype(bool),
        numbers[sr.ARRAY_ROW].astype(np.int64),
        numbers[sr.ARRAY_COL].astype(np.int64),
        numbers[sr.PXL_ROW].astype(np.float64),
        numbers[sr.PXL_COL].astype(np.float64),
    )
    if (pos.array_row < 0).any() or (pos.array_col < 0).any():
        raise FeatcacheError(f"{path}: negative array_row/array_col; the positions file is malformed.")
    ordered = np.sort(barcode)
    if (ordered[1:] == ordered[:-1]).any():
        dup = ordered[1:][ordered[1:] == ordered[:-1]][0].decode(errors="replace")
        raise FeatcacheError(f"{path}: barcode {dup} appears more than once; each bin must be listed once.")
    cells = np.sort(pos.array_row * (pos.array_col.max() + 1) + pos.array_col)
    if (cells[1:] == cells[:-1]).any():
        raise FeatcacheError(f"{path}: two bins share one (array_row, array_col); the positions file is malformed.")
    return pos


def as_bytes(values) -> np.ndarray:
    """Strings or bytes as a fixed-width bytes array."""
    arr = np.asarray(values)
    return arr if arr.dtype.kind == "S" else np.char.encode(arr.astype(str), "utf-8")


def _parquet_columns(path: Path) -> dict:
    """A parquet table's columns as numpy arrays, strings as fixed-width bytes without a Python object per row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type):
            lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
            if col.null_count == 0 and len(col) and (lengths == lengths[0]).all():
                col = col.cast(pa.binary())
                data = np.frombuffer(col.buffers()[2], np.uint8)
                start = col.offset * int(lengths[0]) + int(np.frombuffer(col.buffers()[1], np.int32)[col.offset])
                fixed = data[start : start + len(col) * int(lengths[0])]
                out[name] = fixed.view(f"S{int(lengths[0])}") if len(col) else np.zeros(0, "S1")
            else:
                out[name] = as_bytes(col.to_pylist())
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _csv_columns(path: Path) -> dict:
    df = pd.read_csv(path)
    if tuple(df.columns) != POSITION_COLUMNS and len(df.columns) == 6 and not set(POSITION_COLUMNS) & set(df.columns):
        df = pd.read_csv(path, header=None, names=list(POSITION_COLUMNS))  # headerless older file
    return {c: (as_bytes(df[c].astype(str)) if c == sr.BARCODE else df[c].to_numpy()) for c in df.columns}


def _read_table(path: Path, reader) -> dict:
    try:
        return reader(path)
    except pd.errors.EmptyDataError:
        raise FeatcacheError(f"{path} is empty; the Space Ranger {sr.SPATIAL}/ folder is incomplete.") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many types for damaged files
        raise FeatcacheError(
            f"cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}); the file is damaged "
            "or not a positions table."
        ) from None


def match(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """For each key, its index in ``among`` (-1 when absent); sorted search, no hash table of Python objects."""
    order = np.argsort(among, kind="stable")
    ranked = among[order]
    at = np.searchsorted(ranked, keys)
    found = at < len(ranked)
    found[found] = ranked[at[found]] == keys[found]
    return np.where(found, order[np.minimum(at, len(ranked) - 1)], -1)


# --------------------------------------------------------------------------- locating files
def find_bin_dir(path: Path) -> Path:
    """Accept a sample folder holding outs/, an outs/ folder, or square_008um/ itself."""
    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"sample folder not found: {path}")
    for cand in (path, path / BIN_DIR, path / sr.OUTS / BIN_DIR):
        if (cand / sr.SPATIAL).is_dir() and cand.name.startswith(sr.SQUARE_PREFIX):
            if cand.name != sr.SQUARE_008UM:
                raise FeatcacheError(
                    f"{cand} holds {cand.name} bins; featcache works on 8 µm bins. Use {sr.SQUARE_008UM}."
                )
            return cand
    raise FeatcacheError(
        f"{path} is not a Space Ranger Visium HD output: expected {sr.OUTS}/{BIN_DIR}/{sr.SPATIAL}/ under it. "
        f"Point --sample NAME=DIR at the folder holding {sr.OUTS}/ (or {sr.OUTS}/ itself, or {sr.SQUARE_008UM}/)."
    )


def find_image(bin_dir: Path) -> Path:
    """The microscope image: ``*tissue_image.<ext>`` in the bin folder or up to three folders above it."""
    found: list[Path] = []
    for folder in [bin_dir, *list(bin_dir.parents)[:3]]:
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            stem = p.name.lower()
            for suffix in (".ome.tif", ".ome.tiff", *IMAGE_SUFFIXES):
                if stem.endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
            else:
                continue
            if p.is_file() and stem.endswith(sr.MICROSCOPE_IMAGE_STEM) and stem not in NOT_MICROSCOPE:
                found.append(p)
    if not found:
        raise FeatcacheError(
            f"no full-resolution microscope image (*tissue_image.btf/.tif/.jpg ...) near {bin_dir}. "
            "Pass it with --image NAME=FILE."
        )
    if len(found) > 1:
        raise FeatcacheError(
            f"several candidate microscope images near {bin_dir}: {', '.join(p.name for p in found)}. "
            "Choose one with --image NAME=FILE."
        )
    return found[0]


def read_scalefactors(spatial: Path) -> dict:
    """scalefactors_json.json as a dict whose numeric entries are checked to be positive numbers."""
    path = spatial / sr.SCALEFACTORS
    if not path.is_file():
        raise FeatcacheError(f"{path} not found; the Space Ranger {sr.SPATIAL}/ folder is incomplete.")
    try:
        sf = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatcacheError(f"{path} is not valid JSON ({str(exc)[:80]}); the file is damaged.") from None
    if not isinstance(sf, dict):
        raise FeatcacheError(f"{path} holds {type(sf).__name__}, not an object of scale factors; the file is damaged.")
    for key in (sr.MICRONS_PER_PIXEL, sr.BIN_SIZE_UM, sr.SPOT_DIAMETER_FULLRES, sr.TISSUE_HIRES_SCALEF):
        v = sf.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0):
            raise FeatcacheError(f"{path}: {key} is {v!r}, not a positive number; the file is damaged.")
    return sf


def registered_image(spatial: Path, sf: dict, finest_px: float) -> tuple[Path, np.ndarray, float] | str:
    """(file, RGB pixels, scale factor) of a downscale of the image Space Ranger registered the bins to:
    ``tissue_lowres_image.png`` when its pixel is at most ``finest_px`` full-resolution px, else
    ``tissue_hires_image.png`` (the lowres one when that is missing); or why neither can be used."""
    from PIL import Image

    candidates = [
        (spatial / name, sf.get(key))
        for name, key in ((sr.LOWRES_IMAGE, sr.TISSUE_LOWRES_SCALEF), (sr.HIRES_IMAGE, sr.TISSUE_HIRES_SCALEF))
        if (spatial / name).is_file()
        and isinstance(sf.get(key), (int, float))
        and not isinstance(sf.get(key), bool)
        and np.isfinite(sf.get(key))
        and 0 < sf.get(key) <= 1
    ]
    if not candidates:
        return (
            f"no {sr.LOWRES_IMAGE} or {sr.HIRES_IMAGE} with its scale factor "
            f"({sr.TISSUE_LOWRES_SCALEF}, {sr.TISSUE_HIRES_SCALEF}) in {spatial}"
        )
    fine = [c for c in candidates if 1 / c[1] <= finest_px]
    path, scalef = fine[0] if fine else candidates[-1]
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot read {path} ({str(exc)[:80]})"
    return path, pixels, float(scalef)


def microns_per_pixel(sf: dict, path: Path) -> tuple[float, str]:
    """µm per full-resolution pixel and where it came from: the scale factors, or derived as Space Ranger does."""
    if sr.MICRONS_PER_PIXEL in sf:
        return float(sf[sr.MICRONS_PER_PIXEL]), f"{sr.SCALEFACTORS} {sr.MICRONS_PER_PIXEL}"
    if sr.SPOT_DIAMETER_FULLRES in sf:
        return float(sf.get(sr.BIN_SIZE_UM, BIN_UM)) / float(sf[sr.SPOT_DIAMETER_FULLRES]), (
            f"derived: {sr.BIN_SIZE_UM} / {sr.SPOT_DIAMETER_FULLRES}"
        )
    raise FeatcacheError(
        f"{path} has neither {sr.MICRONS_PER_PIXEL} nor {sr.SPOT_DIAMETER_FULLRES}, so the image scale is "
        "unknown; use the scale factors of the Space Ranger run that made the positions."
    )


# --------------------------------------------------------------------------- one sample
@dataclass
class VisiumHDSample:
    """One Visium HD sample at 8 µm, checked and ready to cut into patches."""

    name: str
    bin_dir: Path
    image_path: Path
    positions: Positions
    scalefactors: dict
    microns_per_pixel: float
    mpp_source: str
    registration: Registration
    image_shape: tuple[int, int]
    image_info: dict
    matrix: MatrixH5 | None = field(repr=False)

    @property
    def matrix_path(self) -> Path:
        return self.matrix.path

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.positions.array_row.max()) + 1, int(self.positions.array_col.max()) + 1

    @cached_property
    def column_of_bin(self) -> np.ndarray:
        """For each position row, the matrix column of its barcode (-1 when the matrix has none)."""
        return match(self.positions.barcode, self.matrix.barcodes)

    def grid_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(in_tissue grid, matrix column index grid with -1 where the bin has no column)."""
        pos = self.positions
        rr, cc = pos.array_row, pos.array_col
        in_tissue = np.zeros(self.grid_shape, dtype=bool)
        in_tissue[rr, cc] = pos.in_tissue
        column = np.full(self.grid_shape, -1, dtype=np.int64)
        if self.matrix is not None:
            column[rr, cc] = self.column_of_bin
        return in_tissue, column

    def plan_patches(self, stride: int, min_tissue: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(in-tissue grid, matrix-column grid, patch origins), each patch's bin map fitted: the patches
        ``prepare`` cuts, and ``predict --positions`` cuts again from the same sample."""
        in_tissue, column = self.grid_lookup()
        origins = patch_origins(in_tissue, stride, min_tissue)
        if len(origins) == 0:
            raise FeatcacheError(
                f"sample {self.name}: no 32 × 32-bin window has {min_tissue:.0%} of its bins in "
                f"tissue ({int(in_tissue.sum())} in-tissue bins); lower --min-tissue."
            )
        self.registration.fit_patches(origins, self.grid_shape)
        return in_tissue, column, origins

    def describe(self) -> dict:
        """What dataset.json records about the sample's sources and geometry."""
        return {
            "microns_per_pixel": self.microns_per_pixel,
            "microns_per_pixel_source": self.mpp_source,
            "registration": self.registration.to_json(),
            "grid": list(self.grid_shape),
            "image_shape": list(self.image_shape),
            "image_info": self.image_info,
            "feature_types": self.matrix.feature_type_counts(),
            "space_ranger": self.matrix.software_version or None,
        }


def open_sample(
    name: str, path: str | Path, image: str | Path | None = None, counts: bool = True, px_per_bin: int | None = None
) -> VisiumHDSample:
    """Open and check one sample; the image is probed, the count matrix's header read (its counts are not).

    ``counts=False`` (predicting on a sample's lattice): positions, scale factors and image only.
    ``px_per_bin``: the finest rendering that will be made of it (default 14); an image too coarse for it is
    refused (:data:`MAX_UPSAMPLING`).
    """
    bin_dir = find_bin_dir(Path(path))
    spatial = bin_dir / sr.SPATIAL
    sf = read_scalefactors(spatial)
    positions = read_positions(spatial)
    matrix = MatrixH5(bin_dir / sr.FILTERED_MATRIX) if counts else None
    image_path = Path(image) if image else find_image(bin_dir)
    if not image_path.is_file():
        raise FeatcacheError(f"image for sample {name} not found: {image_path}")
    reg = register(name, *(positions[c] for c in POSITION_COLUMNS[2:]), positions.in_tissue)
    mpp, source = _check_scale(name, sf, spatial, reg)
    image_shape, info = _check_image(name, image_path, positions, reg, px_per_bin or GEOMETRY.px_per_bin)
    sample = VisiumHDSample(name, bin_dir, image_path, positions, sf, mpp, source, reg, image_shape, info, matrix)
    if matrix is None:
        return sample
    unknown = match(matrix.barcodes, positions.barcode) < 0
    if unknown.any():
        examples = ", ".join(b.decode(errors="replace") for b in matrix.barcodes[unknown][:3])
        raise FeatcacheError(
            f"sample {name}: {int(unknown.sum())} barcode(s) in {matrix.path.name} are not in the positions file "
            f"(e.g. {examples}). The matrix and positions come from different runs or bin sizes; use the files of "
            "one Space Ranger output."
        )
    return sample


def _check_scale(name: str, sf: dict, spatial: Path, reg: Registration) -> tuple[float, str]:
    bin_um = float(sf.get(sr.BIN_SIZE_UM, BIN_UM))
    if abs(bin_um - BIN_UM) > 1e-6:
        raise FeatcacheError(
            f"sample {name}: scalefactors say {sr.BIN_SIZE_UM}={bin_um}; featcache needs the 8 µm bins."
        )
    mpp, source = microns_per_pixel(sf, spatial / sr.SCALEFACTORS)
    problems = []
    lattice_um = reg.px_per_bin * mpp
    if abs(lattice_um - BIN_UM) > MPP_TOLERANCE * BIN_UM:
        problems.append(
            f"bin centres are {reg.px_per_bin:.2f} px apart, which at {mpp:.5g} µm/px ({source}) is "
            f"{lattice_um:.2f} µm, not {BIN_UM:g} µm"
        )
    if sr.SPOT_DIAMETER_FULLRES in sf and sr.MICRONS_PER_PIXEL in sf:
        spot_um = float(sf[sr.SPOT_DIAMETER_FULLRES]) * mpp
        if abs(spot_um - bin_um) > MPP_TOLERANCE * bin_um:
            problems.append(
                f"{sr.SPOT_DIAMETER_FULLRES} × {sr.MICRONS_PER_PIXEL} = {spot_um:.2f} µm, not {bin_um:g} µm"
            )
    if problems:
        raise FeatcacheError(
            f"sample {name}: inconsistent µm/px in {spatial / sr.SCALEFACTORS}: "
            + "; ".join(problems)
            + ". The positions and scale factors must describe the same full-resolution image."
        )
    return mpp, source


def _check_image(name: str, path: Path, positions: Positions, reg: Registration, px_per_bin: int) -> tuple[tuple, dict]:
    """Open and probe the image; refuse one that does not cover the tissue or is too coarse to render at
    ``px_per_bin`` (the finest rendering asked for)."""
    from featcache.slide import Slide

    with Slide(path) as slide:
        slide.probe()
        height, width = slide.shape
        info = {"path": str(path), "compression": slide.compression, "levels": len(slide.levels), "notes": slide.notes}
    need = px_per_bin / MAX_UPSAMPLING
    t = positions.in_tissue
    if not t.any():
        raise FeatcacheError(f"sample {name}: no bin is marked {sr.IN_TISSUE} in the positions file.")
    half = reg.px_per_bin / 2
    rows, cols = positions.pxl_row_in_fullres[t], positions.pxl_col_in_fullres[t]
    r_lo, r_hi = rows.min() - half, rows.max() + half
    c_lo, c_hi = cols.min() - half, cols.max() + half
    wanted = f"the full-resolution microscope image (at least {need:.1f} px per 8 µm bin)"
    if r_hi > height or c_hi > width or r_lo < 0 or c_lo < 0:
        scale = min(height / max(r_hi, 1), width / max(c_hi, 1))
        hint = (
            f"; it looks downscaled about {1 / scale:.1f}× (a tissue_hires/lowres PNG or a CytAssist image?)"
            if scale < 0.9
            else ""
        )
        raise FeatcacheError(
            f"sample {name}: image {path.name} is {height} × {width} px but the in-tissue bins reach rows "
            f"{r_lo:.0f}..{r_hi:.0f}, cols {c_lo:.0f}..{c_hi:.0f}{hint}. Pass {wanted} with --image {name}=FILE."
        )
    if reg.px_per_bin < need:
        raise FeatcacheError(
            f"sample {name}: image {path.name} has {reg.px_per_bin:.1f} px per 8 µm bin; rendering {px_per_bin} "
            f"px per bin would upsample it {px_per_bin / reg.px_per_bin:.1f}×. Pass {wanted} with --image"
            + (
                f", or leave out the {px_per_bin} px rendering (--px-per-bin)."
                if px_per_bin != GEOMETRY.px_per_bin
                else "."
            )
        )
    return (height, width), info
