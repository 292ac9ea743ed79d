"""The Visium HD reader, checked against scanpy's independent 10x reader and the true geometry."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import BIN8, clone_sample, dense_counts

from featcache.slide import Slide
from featcache.spaceranger import bin_barcode, parse_bin_barcode
from featcache.visium import open_sample


def test_matrix_matches_scanpy(synth_dir):
    import scanpy as sc

    path = synth_dir / "P1" / BIN8 / "filtered_feature_bc_matrix.h5"
    ours, dense = dense_counts(path)
    theirs = sc.read_10x_h5(path, gex_only=False)  # repeated gene names are fine here
    assert list(theirs.obs_names) == [b.decode() for b in ours.barcodes]
    assert list(theirs.var["gene_ids"]) == list(ours.feature_ids)
    assert np.array_equal(theirs.X.toarray().astype(np.int64), dense.astype(np.int64))


def test_registration_recovers_true_map(synth_dir):
    for name in ("P1", "P2"):
        s = open_sample(name, synth_dir / name)
        with h5py.File(synth_dir / name / "synthetic_truth.h5") as f:
            truth = f["affine"][()]
        m = s.registration.global_map.matrix
        assert np.allclose(m[:2], truth, atol=1e-6) and np.allclose(m[2], [0, 0, 1], atol=1e-9)
        assert s.registration.global_residual_bins < 1e-6 and not s.registration.local
        assert abs(s.registration.px_per_bin * s.microns_per_pixel - 8.0) < 1e-6
    assert open_sample("P2", synth_dir / "P2").registration.to_json()["flipped"]


def test_accepts_outs_or_bin_folder_and_older_csv(synth_dir, tmp_path):
    a = open_sample("P1", synth_dir / "P1")
    b = open_sample("P1", synth_dir / "P1" / "outs", image=a.image_path)
    c = open_sample("P1", synth_dir / "P1" / BIN8, image=a.image_path)
    assert a.bin_dir == b.bin_dir == c.bin_dir
    # Older outputs: tissue_positions.csv with a header instead of parquet.
    copy = clone_sample(synth_dir / "P1", tmp_path / "P1")
    spatial = copy / BIN8 / "spatial"
    pd.read_parquet(spatial / "tissue_positions.parquet").to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "tissue_positions.parquet").unlink()
    d = open_sample("P1", copy)
    assert np.allclose(d.registration.global_map.matrix, a.registration.global_map.matrix)
    assert d.positions["in_tissue"].sum() == a.positions["in_tissue"].sum()


def test_slide_reads_regions_lazily_and_exactly(synth_dir):
    path = synth_dir / "P1" / "P1_tissue_image.btf"
    full = tifffile.imread(path)
    with Slide(path) as slide:
        assert slide.shape == full.shape[:2]
        assert slide.downsample[1] == (2.0, 2.0)
        assert np.array_equal(slide.read(0, 100, 700, 50, 1234), full[100:700, 50:1234])
        # off the image edge is white
        edge = slide.read(0, -10, 20, full.shape[1] - 5, full.shape[1] + 5)
        assert (edge[:10] == 255).all() and (edge[:, 5:] == 255).all()
        assert np.array_equal(edge[10:, :5], full[:20, -5:])
        assert slide.choose_level(2.09) == 1 and slide.choose_level(1.5) == 0


def test_a_bin_barcode_reads_back_as_its_array_row_and_column():
    for row, col in ((0, 0), (12, 3456), (99999, 7), (123456, 1)):
        assert parse_bin_barcode(bin_barcode(row, col)) == (row, col)
    assert parse_bin_barcode("s_016um_00010_00020-1", size_um=16) == (10, 20)
    for other in ("s_016um_00010_00020-1", "s_008um_10_20-1", "AAACCCAAGG-1", "s_008um_00010_00020"):
        with pytest.raises(ValueError, match="not a Space Ranger barcode"):
            parse_bin_barcode(other)
