"""Stage 3: lazy labelled xarray views, stitching, results, and the figures."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from conftest import run_fold

import analysis
from analysis.figures import comparison_figures, spatial_figures
from featcache.errors import FeatcacheError


@pytest.fixture(scope="module")
def finished_run(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="random",
        decoder="linear",
        epochs=2,
        batch_size=4,
        seed=0,  # a random-init run reads random:<seed> features; the session's store holds random:0
        device="cpu",
        workspace=ws,
        show_progress=False,
        overwrite=True,
    )
    return ws, res.run_dir


def test_features_and_targets_are_lazy_and_labelled(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    f = analysis.open_features("tiny", "tiny-cnn-random", "P1", workspace=ws)
    assert f.dims == ("patch", "row", "col", "channel") and f.shape[1:] == (14, 14, 96)
    assert isinstance(f.data, da.Array) and {"origin_row", "origin_col"} <= set(f.coords)
    t = analysis.open_targets("tiny", "P1", workspace=ws)
    assert t.counts.dims == ("patch", "gene", "row", "col") and isinstance(t.counts.data, da.Array)
    assert "EPCAM" in t.gene.values and "gene_id" in t.coords


def test_open_run_and_stitch_put_bins_at_array_coordinates(finished_run):
    ws, run_dir = finished_run
    run = analysis.open_run(run_dir)
    assert run.pred.dims == ("patch", "gene", "row", "col") and isinstance(run.pred.data, da.Array)
    assert run.attrs["metrics"]["fold"] == "P2" and "origin" in run.coords
    gene = str(run.gene.values[0])
    truth = analysis.stitch(run, gene, "truth")
    assert truth.dims == ("array_row", "array_col")
    targets = analysis.open_targets("tiny", "P2", workspace=ws)
    covered = np.zeros(truth.shape, bool)
    for p, (r0, c0) in enumerate(run.origin.values):
        block = truth.sel(array_row=slice(r0, r0 + 31), array_col=slice(c0, c0 + 31)).values
        assert np.array_equal(block, run.truth.values[p, 0])
        covered[
            r0 - truth.array_row.values[0] : r0 - truth.array_row.values[0] + 32,
            c0 - truth.array_col.values[0] : c0 - truth.array_col.values[0] + 32,
        ] = True
        # the same bins in the targets store: in tissue exactly where the run's mask says
        assert np.array_equal(targets.mask.values[p], run.mask.values[p])
    assert np.isnan(truth.values[~covered]).all() and np.isfinite(truth.values[covered]).all()
    with pytest.raises(FeatcacheError, match="not in this run"):
        analysis.stitch(run, "NOPE")


def test_open_results_over_encoder_mode_fold_gene(finished_run):
    ws, _ = finished_run
    res = analysis.open_results("tiny", workspace=ws)
    assert res.pcc_gene.dims == ("encoder", "mode", "fold", "seed")  # each seed its own run
    assert res.pcc_per_gene.dims == ("encoder", "mode", "fold", "seed", "gene")
    assert "tiny-cnn" in res.encoder.values and "P2" in res.fold.values
    v = res.pcc_gene.sel(encoder="tiny-cnn", mode="random-linear", fold="P2", seed=0).item()
    assert np.isfinite(v)


def test_hand_made_reference_file_can_be_drawn(tmp_path):
    """The reference study's per-fold PCCs (docs/design.md §6), written by hand in its schema."""
    folds = {
        "densenet121": ([0.294, 0.301, 0.322], [0.332, 0.325, 0.369]),
        "uni2h": ([0.333, 0.344, 0.370], None),
        "virchow2": ([0.347, 0.341, 0.368], None),
        "hoptimus0": ([0.293, 0.306, 0.329], None),
    }
    results = {}
    for enc, (frozen, tuned) in folds.items():
        for mode, vals in (("frozen", frozen), ("finetune", tuned)):
            if vals is None:
                continue
            results[f"{enc}_{mode}"] = {
                "encoder": enc,
                "frozen": mode == "frozen",
                "pearson_r": {"mean": float(np.mean(vals)), "std": float(np.std(vals))},
                "mse": {"mean": 0.5, "std": 0.01},
                "ssim_st": {"mean": 0.3, "std": 0.02},
                "spearman_rho": {"mean": 0.3, "std": 0.02},
                "fold_results": {f"test_{p}": {"pearson_r": v, "mse": 0.5} for p, v in zip(("P1", "P2", "P5"), vals)},
            }
    results["densenet121_random"] = {
        "encoder": "densenet121",
        "frozen": True,
        "pearson_r": {"mean": 0.07, "std": 0.01},
        "fold_results": {"test_P1": {"pearson_r": 0.07}},
    }
    path = tmp_path / "encoder_loocv_comparison.json"
    path.write_text(json.dumps({"summary": {}, "methodology": {}, "results": results}))
    written = comparison_figures(path, tmp_path / "figs")
    names = {p.name for p in written}
    for stem in (
        "encoder_comparison",
        "encoder_comparison_grouped",
        "encoder_simple",
        "params_vs_pcc",
        "per_fold_consistency",
    ):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all(p.stat().st_size > 5000 for p in written)


def test_spatial_rows_and_summary(finished_run):
    ws, run_dir = finished_run
    out = ws / "figs"
    with pytest.raises(FeatcacheError, match="NOT_IN_PANEL not in the panel"):  # checked before anything is drawn
        spatial_figures(
            "tiny", "P2", {"tiny-cnn/random-linear": run_dir}, ["EPCAM", "DES", "NOT_IN_PANEL"], out, workspace=ws
        )
    assert not out.exists()
    written = spatial_figures("tiny", "P2", {"tiny-cnn/random-linear": run_dir}, ["EPCAM", "DES"], out, workspace=ws)
    names = {p.name for p in written}
    assert {"epithelial_EPCAM_P2.png", "muscle_DES_P2.pdf", "metrics_summary_P2.json"} <= names
    assert all(p.stat().st_size > 5000 for p in written if p.suffix in (".png", ".pdf"))
    summary = json.loads((out / "metrics_summary_P2.json").read_text())
    assert set(summary["runs"]["tiny-cnn/random-linear"]) >= {"pcc_gene", "ssim_st"}
