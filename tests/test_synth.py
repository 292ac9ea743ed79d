"""The synthetic dataset: real Space Ranger layout, realistic statistics, determinism."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import BIN8, SMALL, dense_counts

from featcache.synth import COMPARTMENTS, MARKERS, SynthConfig, synthesize


def test_layout_is_space_ranger_like(synth_dir):
    root = synth_dir / "P1"
    b = root / BIN8
    for rel in (
        "filtered_feature_bc_matrix.h5",
        "raw_feature_bc_matrix.h5",
        "spatial/tissue_positions.parquet",
        "spatial/scalefactors_json.json",
        "spatial/tissue_hires_image.png",
        "spatial/tissue_lowres_image.png",
    ):
        assert (b / rel).is_file(), rel
    assert (root / "outs" / "feature_slice.h5").is_file()
    with h5py.File(root / "outs" / "feature_slice.h5") as f:
        assert json.loads(f.attrs["metadata_json"])["sample_id"] == "P1"
    pos = pd.read_parquet(b / "spatial" / "tissue_positions.parquet")
    assert list(pos.columns) == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert len(pos) == SMALL.rows * SMALL.cols  # every bin, in and out of tissue
    assert pos["barcode"].iloc[1] == "s_008um_00000_00001-1"
    sf = json.loads((b / "spatial" / "scalefactors_json.json").read_text())
    assert sf["microns_per_pixel"] == pytest.approx(0.2738)
    assert sf["spot_diameter_fullres"] * sf["microns_per_pixel"] == pytest.approx(8.0)
    with h5py.File(b / "filtered_feature_bc_matrix.h5") as f:
        assert f.attrs["filetype"] == "matrix"
        assert set(f["matrix/features"]) >= {"id", "name", "feature_type", "genome", "_all_tag_keys"}
        assert f["matrix/data"].dtype == np.int32 and f["matrix/indptr"].dtype == np.int64
    with tifffile.TiffFile(root / "P1_tissue_image.btf") as tf:
        assert tf.is_bigtiff and tf.pages[0].is_tiled
        assert len(tf.series[0].levels) >= 2  # a pyramid


def test_expression_follows_compartments_and_is_realistic(synth_dir):
    root = synth_dir / "P1"
    m, counts = dense_counts(root / BIN8 / "filtered_feature_bc_matrix.h5")
    with h5py.File(root / "synthetic_truth.h5") as f:
        frac = f["compartment_fractions"][()]
        rates = f["rates"][()]
        assert [c.decode() for c in f["compartments"][()]] == list(COMPARTMENTS)
    assert set(MARKERS) <= set(m.feature_names)
    lib = counts.sum(1)
    assert 200 < np.median(lib) < 700  # real 8 µm bins: median ~380 UMIs
    name = list(m.feature_names)
    epcam, des = counts[:, name.index("EPCAM")], counts[:, name.index("DES")]
    tumour, muscle = frac[:, COMPARTMENTS.index("tumour")] > 0.8, frac[:, COMPARTMENTS.index("muscle")] > 0.8
    assert tumour.sum() > 20 and muscle.sum() > 20
    assert epcam[tumour].mean() > 5 * epcam[muscle].mean()
    assert des[muscle].mean() > 5 * des[tumour].mean()
    mito = sum(counts[:, name.index(g)] for g in ("MT-CO3", "MT-ATP6", "MT-CO1", "MT-CO2", "MT-ND4"))
    assert 0.02 < mito.sum() / lib.sum() < 0.08  # ~4 % mitochondrial
    # Overdispersed: variance exceeds the Poisson variance given the true rate.
    g = name.index("CEACAM5")
    resid = counts[:, g] - rates[:, g]
    assert (resid**2).mean() > 1.5 * rates[:, g].mean()
    # The noise ceiling (PCC of the true rate with the observed counts, log1p CP10k) is below 1.
    norm = lambda x, lib: np.log1p(x / np.maximum(lib, 1)[:, None] * 1e4)  # noqa: E731
    r = np.corrcoef(norm(rates[:, [g]], rates.sum(1))[:, 0], norm(counts[:, [g]], lib)[:, 0])[0, 1]
    assert 0.3 < r < 0.98


def test_patients_differ(synth_dir):
    libs, colours = [], []
    for s in ("P1", "P2"):
        m = dense_counts(synth_dir / s / BIN8 / "filtered_feature_bc_matrix.h5")[1]
        libs.append(np.median(m.sum(axis=1)))
        img = tifffile.imread(synth_dir / s / f"{s}_tissue_image.btf", level=1)
        colours.append(img.reshape(-1, 3).mean(0))
    assert abs(libs[0] - libs[1]) > 10
    assert np.abs(colours[0] - colours[1]).max() > 1.0


def test_deterministic_per_seed(tmp_path):
    cfg = SynthConfig(rows=40, cols=40, n_genes=80, seed=11)
    synthesize(tmp_path / "a", ["X"], cfg)
    synthesize(tmp_path / "b", ["X"], cfg)
    synthesize(tmp_path / "c", ["X"], SynthConfig(rows=40, cols=40, n_genes=80, seed=12))
    fa, fb, fc = (tmp_path / d / "X" / BIN8 / "filtered_feature_bc_matrix.h5" for d in "abc")
    (ma, da), (mb, db), (_, dc) = dense_counts(fa), dense_counts(fb), dense_counts(fc)
    assert np.array_equal(da, db) and list(ma.barcodes) == list(mb.barcodes)
    assert da.shape != dc.shape or not np.array_equal(da, dc)
    ia = tifffile.imread(tmp_path / "a" / "X" / "X_tissue_image.btf")
    ib = tifffile.imread(tmp_path / "b" / "X" / "X_tissue_image.btf")
    assert np.array_equal(ia, ib)


def test_refuses_existing_output(synth_dir):
    from featcache.errors import FeatcacheError

    with pytest.raises(FeatcacheError, match="already exists"):
        synthesize(synth_dir, ["P1"], SMALL)


def test_gene_minimum_is_the_one_help_states(tmp_path):
    """`synth --help` and the refusal name the same minimum, and that minimum is enough to synthesize."""
    import subprocess
    import sys

    from featcache.synth import MIN_GENES

    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb"}
    run = [sys.executable, "-m", "featcache", "synth"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=120).stdout
    assert f"at least {MIN_GENES} " in " ".join(shown.split()), shown
    p = subprocess.run(
        [*run, str(tmp_path / "few"), "--genes", str(MIN_GENES - 1)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"--genes must be at least {MIN_GENES} " in " ".join(p.stderr.split()), p.stderr
    assert not (tmp_path / "few").exists()
    synthesize(tmp_path / "min", ["X"], SynthConfig(rows=32, cols=32, n_genes=MIN_GENES, seed=1))
    assert dense_counts(tmp_path / "min" / "X" / BIN8 / "filtered_feature_bc_matrix.h5")[1].shape[1] == MIN_GENES
