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
    # a seed-1 random-init run never reads the seed-0 store: it names the store it needs and how to make it
    r = CliRunner().invoke(
        app,
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
    assert set(run["floor"]) == {"pearson_r", "spearman_rho", "ssim_st", "mse", "pcc_gene", "spearman_gene"}
    assert run["floor"]["pcc_gene"]["mean"] == 0.0 and run["floor"]["mse"]["mean"] > run["mse"]["mean"] * 0.5
    m = json.loads((ws / run["fold_results"]["test_P1"]["run_dir"] / "metrics.json").read_text())
    assert run["fold_results"]["test_P1"]["floor"]["ssim_st"] == m["baselines"]["per_gene_mean"]["ssim_st"]
    # the noise ceiling with its Monte Carlo error, per fold and for the mean over folds
    assert run["fold_results"]["test_P1"]["noise_ceiling_pcc_gene_mc_error"] <= 0.002
    assert 0 < run["noise_ceiling_pcc_gene"]["mc_error"] <= 0.002


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
