"""Space Ranger's names on disk for a Visium HD output (docs/design.md §3): folders, files, table columns,
scale-factor keys, the datasets of the feature-barcode matrix, feature types and the bin barcode.

The reader (featcache/visium.py) looks for these names and the synthetic generator (featcache/synth.py)
writes them, so both take them from here. They are 10x Genomics' names, as its documentation of the
Space Ranger 3.x/4.x outputs (the Visium HD output layout and the feature-barcode matrix HDF5 format)
describes them and as real deposits carry them; none of them is ours to change. The tests keep the
literal names on purpose: they check the real layout independently of this module.
"""

from __future__ import annotations

import re
from pathlib import Path

# --------------------------------------------------------------------------- folders
OUTS = "outs"  # the run's output folder
BINNED_OUTPUTS = "binned_outputs"  # outs/binned_outputs/square_<size>um/
SEGMENTED_OUTPUTS = "segmented_outputs"  # Space Ranger 4: outs/segmented_outputs/, beside the bins
SQUARE_PREFIX = "square_"
SPATIAL = "spatial"  # <bin folder>/spatial/: positions, scale factors, downscaled images


def bin_folder(size_um: int) -> str:
    """The folder of one bin size: ``square_002um``, ``square_008um``, ``square_016um``."""
    return f"{SQUARE_PREFIX}{size_um:03d}um"


SQUARE_002UM = bin_folder(2)
SQUARE_008UM = bin_folder(8)
SQUARE_016UM = bin_folder(16)
BIN_DIR = Path(BINNED_OUTPUTS) / SQUARE_008UM  # the 8 µm bins, relative to outs/

# --------------------------------------------------------------------------- files
FILTERED_MATRIX = "filtered_feature_bc_matrix.h5"  # in-tissue bins only
RAW_MATRIX = "raw_feature_bc_matrix.h5"  # every bin
POSITIONS_PARQUET = "tissue_positions.parquet"  # in spatial/
POSITIONS_CSV = "tissue_positions.csv"  # older outputs, in spatial/ (some without a header)
SCALEFACTORS = "scalefactors_json.json"  # in spatial/
HIRES_IMAGE = "tissue_hires_image.png"  # in spatial/, longest side 6000 px
LOWRES_IMAGE = "tissue_lowres_image.png"  # in spatial/, longest side 600 px
FEATURE_SLICE = "feature_slice.h5"  # in outs/
FEATURE_SLICE_METADATA = "metadata_json"  # feature_slice.h5's root attribute (JSON text)
FEATURE_SLICES = "feature_slices"  # feature_slice.h5's group of per-feature 2 µm images
METRICS_SUMMARY = "metrics_summary.csv"  # in outs/
CELL_SEGMENTATIONS = "cell_segmentations.geojson"  # in outs/segmented_outputs/ (Space Ranger 4)

# The full-resolution microscope image is supplied beside the run; 10x names it
# ``<dataset>_tissue_image.btf``. The other ``*tissue_image`` names are Space Ranger's own downscaled
# or registered images, never the microscope's.
MICROSCOPE_IMAGE_STEM = "tissue_image"
NOT_MICROSCOPE = frozenset(
    {"tissue_hires_image", "tissue_lowres_image", "detected_tissue_image", "aligned_tissue_image"}
)

# --------------------------------------------------------------------------- tissue positions
# One row per bin, in and out of tissue, in this column order; pixel values are bin centres in the
# full-resolution image (row = y, col = x).
BARCODE = "barcode"
IN_TISSUE = "in_tissue"
ARRAY_ROW = "array_row"
ARRAY_COL = "array_col"
PXL_ROW = "pxl_row_in_fullres"
PXL_COL = "pxl_col_in_fullres"
POSITION_COLUMNS = (BARCODE, IN_TISSUE, ARRAY_ROW, ARRAY_COL, PXL_ROW, PXL_COL)

# --------------------------------------------------------------------------- scale factors
MICRONS_PER_PIXEL = "microns_per_pixel"  # absent from older outputs
BIN_SIZE_UM = "bin_size_um"
SPOT_DIAMETER_FULLRES = "spot_diameter_fullres"  # bin_size_um / microns_per_pixel
TISSUE_HIRES_SCALEF = "tissue_hires_scalef"
TISSUE_LOWRES_SCALEF = "tissue_lowres_scalef"
REGIST_TARGET_IMG_SCALEF = "regist_target_img_scalef"
FIDUCIAL_DIAMETER_FULLRES = "fiducial_diameter_fullres"

# --------------------------------------------------------------------------- feature-barcode matrix (HDF5, v2)
# Root attributes
ATTR_FILETYPE = "filetype"  # "matrix"
ATTR_LIBRARY_IDS = "library_ids"
ATTR_ORIGINAL_GEM_GROUPS = "original_gem_groups"
ATTR_VERSION = "version"  # 2
ATTR_CHEMISTRY = "chemistry_description"
ATTR_SOFTWARE_VERSION = "software_version"
# /matrix: compressed sparse columns, one column per bin
MATRIX = "matrix"
BARCODES = "barcodes"
DATA = "data"  # int32 counts
INDICES = "indices"  # int64 feature index per count
INDPTR = "indptr"  # int64, n_bins + 1
SHAPE = "shape"  # (n_features, n_bins)
FEATURES = "features"
MATRIX_DATASETS = (BARCODES, DATA, INDICES, INDPTR, SHAPE, FEATURES)
# /matrix/features
FEATURE_ID = "id"
FEATURE_NAME = "name"  # gene names can repeat; ids do not
FEATURE_TYPE = "feature_type"
GENOME = "genome"
ALL_TAG_KEYS = "_all_tag_keys"

# --------------------------------------------------------------------------- feature types
GENE_EXPRESSION = "Gene Expression"
ANTIBODY_CAPTURE = "Antibody Capture"


# --------------------------------------------------------------------------- barcodes
def bin_barcode(row: int, col: int, size_um: int = 8) -> str:
    """A bin's barcode, ``s_008um_RRRRR_CCCCC-1`` for the 8 µm bin at (array_row, array_col)."""
    return f"s_{size_um:03d}um_{row:05d}_{col:05d}-1"


_BIN_BARCODE = re.compile(r"s_(\d{3})um_(\d{5,})_(\d{5,})-1")


def parse_bin_barcode(barcode: str, size_um: int = 8) -> tuple[int, int]:
    """(array_row, array_col) of a ``size_um`` bin's barcode, the inverse of :func:`bin_barcode`; ValueError for
    a barcode of another form or bin size."""
    m = _BIN_BARCODE.fullmatch(barcode)
    if m is None or int(m[1]) != size_um:
        raise ValueError(
            f"{barcode!r} is not a Space Ranger barcode of a {size_um} µm bin (s_{size_um:03d}um_RRRRR_CCCCC-1)"
        )
    return int(m[2]), int(m[3])
