"""Bad input: one clear message, a non-zero exit, and nothing written or damaged."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pandas as pd
import pytest
import tifffile
from conftest import BIN8, clone_sample
from typer.testing import CliRunner

from featcache.cli import app


def run_prepare(ws, *args):
    result = CliRunner().invoke(app, ["prepare", "--dataset", "bad", "--workspace", str(ws), *args])
    return result


def assert_refused(result, ws, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output
    datasets = ws / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir()), "something was left in the workspace"


@pytest.fixture
def p1(synth_dir, tmp_path):
    return clone_sample(synth_dir / "P1", tmp_path / "P1")


def spatial(sample):
    return sample / BIN8 / "spatial"


def test_missing_sample_folder(tmp_path):
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={tmp_path / 'nope'}"), tmp_path / "ws", "not found")


def test_missing_matrix(p1, tmp_path):
    (p1 / BIN8 / "filtered_feature_bc_matrix.h5").unlink()
    assert_refused(
        run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "filtered_feature_bc_matrix.h5"
    )


def test_missing_image(p1, tmp_path):
    (p1 / "P1_tissue_image.btf").unlink()
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "--image")


def test_missing_scalefactors(p1, tmp_path):
    (spatial(p1) / "scalefactors_json.json").unlink()
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "scalefactors_json.json")


def test_positions_with_wrong_columns(p1, tmp_path):
    path = spatial(p1) / "tissue_positions.parquet"
    pd.read_parquet(path).rename(columns={"array_col": "col"}).to_parquet(path)
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "array_col")


def test_matrix_barcodes_absent_from_positions(p1, tmp_path):
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    drop = pos.index[pos.in_tissue == 1][:5]
    pos.drop(drop).to_parquet(path)
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "5 barcode(s)", "not in")


def test_positions_not_affine(p1, tmp_path):
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    pos.loc[100, "pxl_row_in_fullres"] += 40.0
    pos.to_parquet(path)
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "not an affine lattice")


def test_image_smaller_than_positions_need(p1, tmp_path):
    img = tifffile.imread(p1 / "P1_tissue_image.btf")
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, img[: img.shape[0] // 2], photometric="rgb")
    assert_refused(
        run_prepare(tmp_path / "ws", "--sample", f"P1={p1}", "--image", f"P1={small}"),
        tmp_path / "ws",
        "full-resolution",
    )


def test_inconsistent_microns_per_pixel(p1, tmp_path):
    path = spatial(p1) / "scalefactors_json.json"
    sf = json.loads(path.read_text())
    sf["microns_per_pixel"] = 0.5
    path.write_text(json.dumps(sf))
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "inconsistent µm/px")


def test_unknown_gene_in_gene_list(p1, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("EPCAM\nDES\nNOT_A_GENE\n")
    assert_refused(
        run_prepare(tmp_path / "ws", "--sample", f"P1={p1}", "--genes", str(genes)), tmp_path / "ws", "NOT_A_GENE"
    )


def test_duplicate_sample_name(p1, tmp_path):
    assert_refused(
        run_prepare(tmp_path / "ws", "--sample", f"P1={p1}", "--sample", f"P1={p1}"), tmp_path / "ws", "twice"
    )


def test_truncated_matrix(p1, tmp_path):
    path = p1 / BIN8 / "filtered_feature_bc_matrix.h5"
    path.write_bytes(path.read_bytes()[:2000])
    assert_refused(run_prepare(tmp_path / "ws", "--sample", f"P1={p1}"), tmp_path / "ws", "HDF5")


def test_gene_list_by_name_and_id(p1, tmp_path):
    with h5py.File(p1 / BIN8 / "filtered_feature_bc_matrix.h5") as f:
        ids = [v.decode() for v in f["matrix/features/id"][()]]
    genes = tmp_path / "genes.txt"
    genes.write_text(f"# panel\nEPCAM\n{ids[40]}\nDES  # smooth muscle\n")
    ws = tmp_path / "ws"
    result = run_prepare(ws, "--sample", f"P1={p1}", "--genes", str(genes))
    assert result.exit_code == 0, result.output
    meta = json.loads((ws / "datasets" / "bad" / "dataset.json").read_text())
    assert meta["genes"]["names"][0] == "EPCAM" and meta["genes"]["ids"][1] == ids[40]
    assert meta["genes"]["names"][2] == "DES"


def test_existing_dataset_with_different_inputs_is_kept(p1, synth_dir, tmp_path):
    ws = tmp_path / "ws"
    assert run_prepare(ws, "--sample", f"P1={p1}").exit_code == 0
    meta_path = ws / "datasets" / "bad" / "dataset.json"
    before = meta_path.read_bytes()
    result = run_prepare(ws, "--sample", f"P1={p1}", "--min-tissue", "0.9")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert meta_path.read_bytes() == before
    result = run_prepare(ws, "--sample", f"P1={p1}", "--min-tissue", "0.9", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(meta_path.read_text())["geometry"]["min_tissue"] == 0.9
    assert [p.name for p in (ws / "datasets").iterdir()] == ["bad"]


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featcache",
            "prepare",
            "--dataset",
            "x",
            "--sample",
            f"P1={tmp_path / 'missing'}",
            "--workspace",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
