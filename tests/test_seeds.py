"""Runs are what their stores say, and seeds: one run folder and one random-init store per seed, and a fold's
stored truth that does not depend on the seed's validation split (docs/design.md §7)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from featcache.stores import Workspace
from pipeline.cli import train_app as app
from train.data import FoldInputs, TargetTransform, load_targets

BASE = ["--dataset", "tiny", "--decoder", "linear", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def _copy(src, dst):
    for sub in ("datasets", "features"):
        shutil.copytree(src / sub, dst / sub)
    return dst


def test_a_random_store_is_not_trained_as_frozen(tiny_cnn_features, tmp_path):
    ws = _copy(tiny_cnn_features[0], tmp_path / "ws")
    # the random-init store named as if it were an encoder, under the default mode (frozen)
    r = CliRunner().invoke(
        app, ["decoder", "--encoder", "tiny-cnn-random", "--fold", "P1", *BASE, "--workspace", str(ws)]
    )
    assert r.exit_code != 0 and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert "random:0" in r.output and "--encoder tiny-cnn --mode random --seed 0" in r.output
    assert not (ws / "runs").exists()
    # a seed-1 random-init run never reads the seed-0 store: the stage's own command (which extracts nothing) names
    # the store it needs and how to make it; the `train` command extracts it (the next test)
    from train.cli import app as stage_app

    r = CliRunner().invoke(
        stage_app,
        [
            "decoder",
            "--encoder",
            "tiny-cnn",
            "--mode",
            "random",
            "--seed",
            "1",
            "--fold",
            "P1",
            *BASE,
            "--workspace",
            str(ws),
        ],
    )
    assert r.exit_code != 0 and "tiny-cnn-random-s1" in r.output and "--weights random:1" in r.output
    assert not (ws / "runs").exists()


def test_seeds_give_their_own_runs_stores_and_the_same_truth(tiny_cnn_features, tmp_path):
    ws = _copy(tiny_cnn_features[0], tmp_path / "ws")
    # seeds 0 and 2 both leave a training patch beside their validation region on these 5-patch sections
    r = CliRunner().invoke(
        app,
        ["loocv", "--encoders", "tiny-cnn", "--modes", "random", "--seeds", "0,2", "--val-fraction", "0.15", *BASE]
        + ["--workspace", str(ws)],
    )
    assert r.exit_code == 0, r.output
    w = Workspace(ws)
    assert w.feature_store("tiny", "tiny-cnn", True, 2).identity["weights"] == "random:2"  # extracted for seed 2
    assert w.feature_store("tiny", "tiny-cnn", True).identity["weights"] == "random:0"
    res = json.loads((ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    run = res["results"]["tiny-cnn_random-linear"]
    assert run["seeds"] == [0, 2] and run["pcc_gene"]["n_seeds"] == 2
    for fold, train_patient in (("P1", "P2"), ("P2", "P1")):
        entry = run["fold_results"][f"test_{fold}"]
        per_seed = entry["per_seed"]
        assert [e["seed"] for e in per_seed] == [0, 2]
        assert [e["run_dir"] for e in per_seed] == [
            f"runs/tiny/tiny-cnn/random-linear/fold-{fold}",
            f"runs/tiny/tiny-cnn/random-linear/fold-{fold}-seed2",
        ]
        assert [e["features_weights"] for e in per_seed] == ["random:0", "random:2"]
        assert entry["pcc_gene"] == pytest.approx(np.mean([e["pcc_gene"] for e in per_seed]))
        truths = [xr.open_zarr(ws / e["run_dir"] / "predictions.zarr").truth.values for e in per_seed]
        assert np.array_equal(truths[0], truths[1])  # the same targets whatever the seed's split
        # z-scored with every patch of the training patient, the buffered-out ones included (and counted)
        inputs = FoldInputs(w.dataset("tiny"), w.feature_store("tiny", "tiny-cnn", True))
        arr = inputs.arrays[train_patient]
        expect = TargetTransform.fit([load_targets(arr, np.arange(len(arr.origin)))])
        ck = torch.load(ws / per_seed[1]["run_dir"] / "checkpoint.pt", weights_only=True)
        assert np.allclose(ck["transform"]["mean"], expect.mean) and np.allclose(ck["transform"]["std"], expect.std)
        m = json.loads((ws / per_seed[1]["run_dir"] / "metrics.json").read_text())
        assert m["training_patches_buffered_out"] == {train_patient: 2}  # 5 patches: 1 trains, 2 validate
    seed_means = [np.mean([f["per_seed"][k]["pcc_gene"] for f in run["fold_results"].values()]) for k in (0, 1)]
    assert run["pcc_gene"]["std_over_seeds"] == pytest.approx(np.std(seed_means))
    assert res["methodology"]["std_ddof"] == 0
    # the floor beside every metric: the training-mean prediction's score, from each fold's metrics.json
    from train.summary import FOLD_KEYS

    assert set(run["floor"]) == set(FOLD_KEYS)  # the 16 and 32 µm scores and HEST's patch metric too
    assert run["floor"]["pcc_gene"]["mean"] == 0.0 and run["floor"]["pcc_gene_32um"]["mean"] == 0.0  # constant
    for fold in ("P1", "P2"):  # the training mean is 0 in z-scored space: the floor's mse is the truth's mean square
        stored = xr.open_zarr(ws / run["fold_results"][f"test_{fold}"]["run_dir"] / "predictions.zarr")
        scored = stored.truth.values.transpose(0, 2, 3, 1)[stored.mask.values.astype(bool)]
        assert run["fold_results"][f"test_{fold}"]["floor"]["mse"] == pytest.approx(np.mean(scored**2), rel=1e-4)
    m = json.loads((ws / run["fold_results"]["test_P1"]["run_dir"] / "metrics.json").read_text())
    assert run["fold_results"]["test_P1"]["floor"]["ssim_st"] == m["baselines"]["per_gene_mean"]["ssim_st"]
    # the noise ceiling with its Monte Carlo error, per fold and for the mean over folds
    assert run["fold_results"]["test_P1"]["noise_ceiling_pcc_gene_mc_error"] <= 0.002
    assert 0 < run["noise_ceiling_pcc_gene"]["mc_error"] <= 0.002


def test_train_decoder_seeds_extract_each_seeds_random_store(tiny_cnn_features, tmp_path):
    """`train decoder --mode random --seeds 0,1` trained seed 0, then refused seed 1 for want of random:1 features."""
    ws = _copy(tiny_cnn_features[0], tmp_path / "ws")
    w = Workspace(ws)
    assert not w.feature_store("tiny", "tiny-cnn", True, 1).exists()
    args = ["decoder", "--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", "--seeds", "0,1", *BASE]
    r = CliRunner().invoke(app, [*args, "--val-fraction", "0", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    assert w.feature_store("tiny", "tiny-cnn", True, 1).identity["weights"] == "random:1"  # drawn for seed 1
    folder = ws / "runs" / "tiny" / "tiny-cnn" / "random-linear"
    metrics = [json.loads((folder / d / "metrics.json").read_text()) for d in ("fold-P2", "fold-P2-seed1")]
    assert [m["features_weights"] for m in metrics] == ["random:0", "random:1"]


def test_loocv_lr_grid_chooses_each_folds_lr_on_validation(tiny_cnn_features, tmp_path):
    """`train loocv --lr-grid` end to end: every lr trained for every fold, the one with the best validation
    pcc_gene kept per fold (recorded as lr_selected), the test patient never consulted."""
    ws = _copy(tiny_cnn_features[0], tmp_path / "ws")
    args = ["loocv", "--encoders", "tiny-cnn", "--modes", "random", "--lr-grid", "1e-4,3e-2", "--val-fraction", "0.15"]
    r = CliRunner().invoke(app, [*args, *BASE, "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    res = json.loads((ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    run = res["results"]["tiny-cnn_random-linear-lrgrid"]
    trials = {}
    for path in (ws / "runs" / "tiny" / "tiny-cnn" / "random-linear-lrgrid").rglob("metrics.json"):
        cfg = json.loads((path.parent / "config.json").read_text())
        trials.setdefault(cfg["fold"], {})[cfg["lr"]] = json.loads(path.read_text())
    assert {f: sorted(t) for f, t in trials.items()} == {"P1": [1e-4, 3e-2], "P2": [1e-4, 3e-2]}
    for fold, by_lr in trials.items():
        entry = run["fold_results"][f"test_{fold}"]
        best = max(by_lr, key=lambda lr: (by_lr[lr]["val_pcc_gene"], -lr))
        assert entry["lr_selected"] == [best]
        assert entry["pcc_gene"] == pytest.approx(by_lr[best]["pcc_gene"])  # the chosen trial's test score


def test_fine_tuning_from_random_weights_draws_an_encoder_per_seed(prepared, tmp_path):
    """`train finetune --weights random --seeds 0,1` started every seed from the same random:0 encoder."""
    ws = tmp_path / "ws"
    shutil.copytree(prepared[0] / "datasets", ws / "datasets")
    args = ["finetune", "--fold", "P2", "--encoder", "tiny-cnn", "--weights", "random", "--seeds", "0,1", *BASE]
    r = CliRunner().invoke(app, [*args, "--micro-batch", "4", "--val-fraction", "0", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    folder = ws / "runs" / "tiny" / "tiny-cnn" / "finetune-randomweights-linear"
    configs = [json.loads((folder / d / "config.json").read_text()) for d in ("fold-P2", "fold-P2-seed1")]
    assert [c["encoder_weights"] for c in configs] == ["random:0", "random:1"]
