"""`featcache predict`: a trained run on slides without Visium data; scverse export."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
from conftest import BIN8, run_fold
from PIL import Image
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from featcache.extract import ExtractionConfig, extract
from pipeline.cli import featcache_app as app


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A workspace with a frozen tiny-cnn run (stand-in weights file) tested on P2."""
    import torch
    from safetensors.torch import save_file

    from featcache.encoders import build_model, get_spec

    src, _ = prepared
    ws = tmp_path_factory.mktemp("predict-ws")
    shutil.copytree(src / "datasets", ws / "datasets")
    weights = ws / "tiny-cnn.safetensors"
    torch.manual_seed(7)
    save_file({k: v.contiguous() for k, v in build_model(get_spec("tiny-cnn")).state_dict().items()}, str(weights))
    extract("tiny", ExtractionConfig("tiny-cnn", str(weights)), workspace=ws, show_progress=False)
    res = run_fold(
        "tiny", "tiny-cnn", "P2", mode="frozen", decoder="unet", epochs=2, batch_size=2, lr=1e-3, workspace=ws
    )
    return ws, res.run_dir, weights


def predict(ws, *args):
    return CliRunner().invoke(app, ["predict", *args, "--workspace", str(ws), "--device", "cpu"])


def test_predicting_on_the_test_sections_lattice_reproduces_the_runs_predictions(trained, synth_dir):
    ws, run_dir, weights = trained
    out = ws / "pred-p2"
    r = predict(
        ws,
        "--run",
        str(run_dir),
        "--image",
        str(synth_dir / "P2" / "P2_tissue_image.btf"),
        "--positions",
        str(synth_dir / "P2"),
        "--weights",
        str(weights),
        "--output",
        str(out),
        "--genes",
        "EPCAM,DES",
    )
    assert r.exit_code == 0, r.output
    mine = xr.open_zarr(out / "predictions.zarr")
    theirs = xr.open_zarr(run_dir / "predictions.zarr")
    assert np.array_equal(mine.origin.values, theirs.origin.values)
    z, pred = mine.z.values.astype(np.float32), theirs.pred.values
    assert np.allclose(z, pred, atol=2e-3 * np.abs(pred).max() + 1e-3)  # bin for bin, float16 tolerance
    assert mine.z.dims == ("patch", "gene", "row", "col") and list(mine.gene.values) == list(theirs.gene.values)
    meta = json.loads((out / "prediction.json").read_text())
    assert meta["lattice"]["source"].startswith("Space Ranger positions")
    # the pixel centres are the positions file's own
    pos = pd.read_parquet(synth_dir / "P2" / BIN8 / "spatial" / "tissue_positions.parquet")
    grid = pos.set_index(["array_row", "array_col"])
    r0, c0 = mine.origin.values[0]
    want = grid.loc[(r0 + 3, c0 + 5), ["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(dtype=float)
    got = [float(mine.pxl_row.values[0, 3, 5]), float(mine.pxl_col.values[0, 3, 5])]
    assert np.allclose(got, want, atol=0.05)
    assert (out / "figures" / "EPCAM.png").stat().st_size > 5000


def test_a_virtual_lattice_covers_the_tissue_with_an_8_um_pitch(trained, synth_dir):
    ws, run_dir, weights = trained
    out = ws / "pred-virtual"
    r = predict(
        ws,
        "--run",
        str(run_dir),
        "--image",
        str(synth_dir / "P1" / "P1_tissue_image.btf"),
        "--weights",
        str(weights),
        "--output",
        str(out),
    )  # µm/px from the TIFF's resolution tags
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out / "predictions.h5ad")
    virtual = a.obsm["spatial"][a.obs["in_tissue"].to_numpy() == 1]  # (x, y)
    pos = pd.read_parquet(synth_dir / "P1" / BIN8 / "spatial" / "tissue_positions.parquet")
    true = pos.loc[pos.in_tissue == 1, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    pitch = 8 / 0.2738
    covered = cKDTree(virtual).query(true)[0] <= pitch
    on_tissue = cKDTree(true).query(virtual)[0] <= pitch
    print(f"true in-tissue bins covered {covered.mean():.3f}; virtual bins on tissue {on_tissue.mean():.3f}")
    assert covered.mean() >= 0.95 and on_tissue.mean() >= 0.90
    d, _ = cKDTree(a.obsm["spatial"]).query(a.obsm["spatial"], k=2)
    assert np.median(d[:, 1]) == pytest.approx(pitch, rel=1e-3)
    meta = json.loads((out / "prediction.json").read_text())
    assert meta["lattice"]["microns_per_pixel_source"] == "TIFF resolution tags"


@pytest.mark.filterwarnings("error::anndata.OldFormatWarning")  # every group carries AnnData's encoding attributes
def test_h5ad_opens_in_anndata_and_draws_with_scanpy(trained, synth_dir):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    ws, run_dir, weights = trained
    out = ws / "pred-scanpy"
    r = predict(
        ws,
        "--run",
        str(run_dir),
        "--image",
        str(synth_dir / "P1" / "P1_tissue_image.btf"),
        "--positions",
        str(synth_dir / "P1"),
        "--weights",
        str(weights),
        "--output",
        str(out),
    )
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out / "predictions.h5ad")
    assert (
        a.X.dtype == np.float32
        and "z" in a.layers
        and list(a.var_names) == json.loads((run_dir / "config.json").read_text())["genes"]
    )
    assert {"array_row", "array_col", "in_tissue"} <= set(a.obs) and a.obsm["spatial"].shape == (a.n_obs, 2)
    lib = next(iter(a.uns["spatial"]))
    assert {"images", "scalefactors"} <= set(a.uns["spatial"][lib])
    ax = sc.pl.spatial(a, color="EPCAM", img_key="hires", show=False, library_id=lib)
    fig = ax[0].get_figure() if isinstance(ax, list) else ax.get_figure()
    fig.savefig(ws / "scanpy-spatial.png")
    assert (ws / "scanpy-spatial.png").stat().st_size > 10_000


def test_predict_refuses(trained, synth_dir, tmp_path):
    ws, run_dir, weights = trained
    image = synth_dir / "P1" / "P1_tissue_image.btf"
    other = tmp_path / "other.safetensors"
    shutil.copy(weights, other)
    data = bytearray(other.read_bytes())
    data[-100] ^= 1  # same shapes, other values: another identity
    other.write_bytes(bytes(data))

    def refused(*args, needle):
        r = predict(ws, "--run", str(run_dir), *args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert needle in r.output, r.output

    refused("--image", str(image), "--weights", str(other), "--output", str(tmp_path / "o1"), needle="not the ones")
    png = tmp_path / "slide.png"
    Image.fromarray(tifffile.imread(image, level=1)).save(png)
    refused("--image", str(png), "--weights", str(weights), "--output", str(tmp_path / "o2"), needle="--mpp")
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(
        blank,
        np.full((2000, 2400, 3), 242, np.uint8),
        photometric="rgb",
        resolutionunit="CENTIMETER",
        resolution=(1e4 / 0.2738, 1e4 / 0.2738),
    )
    refused("--image", str(blank), "--weights", str(weights), "--output", str(tmp_path / "o3"), needle="no tissue")
    refused(
        "--image", str(image), "--weights", str(weights), "--output", str(ws / "pred-virtual"), needle="--overwrite"
    )
    refused("--image", str(image), "--weights", str(weights), "--genes", "NOPE", needle="not in the run's panel")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_analysis_export_of_a_run_and_of_a_feature_store(trained, synth_dir):
    from analysis.cli import app as analysis_app

    ws, run_dir, _ = trained
    r = CliRunner().invoke(analysis_app, ["export", "--run", str(run_dir), "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(ws / "results" / "tiny" / "exports" / "tiny-cnn-frozen-fold-P2.h5ad")
    run = xr.open_zarr(run_dir / "predictions.zarr")
    assert a.n_obs == run.sizes["patch"] * 32 * 32  # stride 32: every bin of every test patch, once
    assert {"pred", "truth"} <= set(a.layers) and a.var_names.tolist() == [str(g) for g in run.gene.values]
    k = a.obs_names.get_loc(f"P2_{run.origin.values[0][0] + 2:05d}_{run.origin.values[0][1] + 7:05d}")
    assert np.isclose(a.layers["truth"][k, 0], run.truth.values[0, 0, 2, 7])
    pos = pd.read_parquet(synth_dir / "P2" / BIN8 / "spatial" / "tissue_positions.parquet")
    row = pos[(pos.array_row == a.obs.array_row.iloc[k]) & (pos.array_col == a.obs.array_col.iloc[k])].iloc[0]
    assert np.allclose(a.obsm["spatial"][k], [row.pxl_col_in_fullres, row.pxl_row_in_fullres], atol=0.01)
    assert a.obs.in_tissue.iloc[k] == int(run.mask.values[0, 2, 7])
    r = CliRunner().invoke(
        analysis_app, ["export", "--features", "tiny-cnn", "--dataset", "tiny", "--workspace", str(ws)]
    )
    assert r.exit_code == 0, r.output
    f = ad.read_h5ad(ws / "results" / "tiny" / "exports" / "tiny-cnn-pooled.h5ad")
    store = xr.open_zarr(ws / "features" / "tiny" / "tiny-cnn.zarr", group="P1")
    assert f.n_vars == 96 and f.n_obs == sum(
        xr.open_zarr(ws / "features" / "tiny" / "tiny-cnn.zarr", group=s).sizes["patch"] for s in ("P1", "P2")
    )
    assert np.allclose(f.X[: store.sizes["patch"]], store.pooled.values)
    r = CliRunner().invoke(analysis_app, ["export", "--run", str(run_dir), "--workspace", str(ws)])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_h5ad_written_band_by_band_averages_overlapping_patches_per_bin(trained, synth_dir, monkeypatch):
    """Half-overlapping patches (stride 16), bands of 8 lattice rows: each bin once, the mean of its patches."""
    from featcache.geometry import bin_table
    from pipeline import predict as P

    ws, run_dir, weights = trained
    monkeypatch.setattr(P, "H5AD_BAND", 8)
    out = ws / "pred-overlap"
    P.predict(
        run_dir,
        synth_dir / "P2" / "P2_tissue_image.btf",
        P.PredictOptions(positions=synth_dir / "P2", stride=16),
        output=out,
        weights=str(weights),
        workspace=ws,
        device="cpu",
        show_progress=False,
    )
    z = xr.open_zarr(out / "predictions.zarr")
    origins = z.origin.values
    assert len(origins) > 4 and np.diff(np.unique(origins[:, 0])).min() == 16  # patches overlap
    keep = np.ones((len(origins), 32, 32), bool)
    coords, expr = bin_table(origins, z.expression.values.astype(np.float32), keep)
    _, xy = bin_table(origins, np.stack([z.pxl_col.values, z.pxl_row.values], axis=1), keep)
    a = ad.read_h5ad(out / "predictions.h5ad")
    assert a.n_obs == len(coords) and a.obs_names.is_unique
    assert np.array_equal(a.obs[["array_row", "array_col"]].to_numpy(), coords)
    assert np.allclose(a.X, expr, atol=1e-5) and np.allclose(a.obsm["spatial"], xy)
    assert list(a.var_names) == list(z.gene.values) and "spatial" in a.uns
