"""The comparison file: the reference study's keys and shapes, rebuilt from run folders (copied-in ones too),
one set of defaults for every command, run variants, and the reproduction mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SMALL, run_fold
from typer.testing import CliRunner

from featcache.stores import Workspace
from featcache.stores.runs import config_digest
from featcache.synth import synthesize
from pipeline.cli import train_app as app
from train.metrics import evaluate
from train.summary import summarize

REFERENCE_RUNS = {  # the reference study's keys -> (our encoder, our mode)
    "densenet_frozen": ("densenet121", "frozen"),
    "densenet_finetuned": ("densenet121", "finetune"),
    "densenet_random_init": ("densenet121", "random"),
    "uni2h_frozen": ("uni2h", "frozen"),
    "virchow2_frozen": ("virchow2", "frozen"),
    "h_optimus_frozen": ("hoptimus0", "frozen"),
}


@pytest.fixture(scope="module")
def trio(synth_dir, tmp_path_factory):
    """A dataset with the reference study's three patients, P1, P2 and P5."""
    from featcache.prepare import prepare_dataset

    extra = tmp_path_factory.mktemp("p5")
    synthesize(extra, ["P5"], SMALL)
    ws = tmp_path_factory.mktemp("trio-ws")
    prepare_dataset(
        "trio",
        {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2"), "P5": str(extra / "P5")},
        workspace=ws,
        show_progress=False,
    )
    return ws


def finished_run(ws, encoder: str, mode: str, fold: str, seed: int) -> dict:
    """A finished run folder written through the store layer, its metrics computed on real arrays."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(4, 5, 32, 32))
    pred = (0.2 + 0.1 * rng.random()) * truth + rng.normal(size=truth.shape)
    m = evaluate(pred, truth, np.ones((4, 32, 32), bool), np.zeros(5), list("ABCDE"))
    m.update(
        {
            "fold": fold,
            "selected_epoch": 7,
            "baselines": {"per_gene_mean": {"mse": 1.0, "pcc_gene": 0.0}},
            "noise_ceiling": None,
            "test_samples": [fold],
            "features_weights": "sha256:abc",
        }
    )
    run = Workspace(ws).run("trio", encoder, mode, fold)
    run.write_config(
        {
            "dataset": "trio",
            "encoder": encoder,
            "mode": mode,
            "run": mode,
            "fold": fold,
            "epochs": 200,
            "batch_size": 64,
            "lr": 1e-4,
            "seed": 0,
            "target": "log1p-cp10k",
            "score": "in-tissue",
            "train_samples": [p for p in ("P1", "P2", "P5") if p != fold],
            "config_sha256": str(seed),
        }
    )
    config = run.read_config()  # made consistent, as RunDir.verified_config requires: its own hash, and the metrics'
    m["config_sha256"] = config["config_sha256"] = config_digest(config)
    run.write_config(config)
    run.write_metrics(m)
    return m


def reference_reads(res: dict) -> None:
    """Every key access the reference study's scripts/generate_figures.py makes, in the same shapes."""
    r = res["results"]
    for key in ("densenet_frozen", "densenet_finetuned", "h_optimus_frozen", "uni2h_frozen", "virchow2_frozen"):
        float(r[key]["pearson_r"]["mean"]), float(r[key]["pearson_r"]["std"])
    for key in ("densenet_frozen", "densenet_finetuned", "h_optimus_frozen", "uni2h_frozen", "virchow2_frozen"):
        assert [float(r[key]["fold_results"][f"test_{p}"]["pearson_r"]) for p in ("P1", "P2", "P5")]


def test_reference_keys_and_shapes(trio):
    made = {
        key: [finished_run(trio, enc, mode, f, 10 * i + j) for j, f in enumerate(("P1", "P2", "P5"))]
        for i, (key, (enc, mode)) in enumerate(REFERENCE_RUNS.items())
    }
    res = summarize("trio", trio)
    assert set(res["results"]) == set(REFERENCE_RUNS)
    for key, folds in made.items():
        run = res["results"][key]
        assert (
            run["encoder"]
            == {"densenet": "DenseNet121", "uni2h": "UNI2-h", "virchow2": "Virchow2", "h_optimus": "H-optimus-0"}[
                key.rsplit("_", 1)[0].removesuffix("_random")
            ]
        )
        assert run["frozen"] is (REFERENCE_RUNS[key][1] != "finetune")
        for ours, theirs in (
            ("pearson_r", "pcc_global"),
            ("spearman_rho", "spearman_global"),
            ("mse", "mse"),
            ("ssim_st", "ssim_st"),
            ("pcc_gene", "pcc_gene"),
        ):
            values = [m[theirs] for m in folds]
            assert run[ours]["mean"] == pytest.approx(np.mean(values)) and run[ours]["std"] == pytest.approx(
                np.std(values)
            )
        assert set(run["fold_results"]) == {"test_P1", "test_P2", "test_P5"}
        assert {"pearson_r", "mse"} <= set(run["fold_results"]["test_P1"])
    s = res["summary"]
    assert set(s) == {"DenseNet", "UNI2-h", "Virchow2", "H-optimus-0"}
    assert set(s["DenseNet"]) == {"frozen", "finetuned", "random_init"} and s["UNI2-h"]["finetuned"] is None
    assert s["DenseNet"]["frozen"] == res["results"]["densenet_frozen"]["pearson_r"]["mean"]
    meth = res["methodology"]
    assert meth["gene_panel"]["test_patient_in_panel_choice"] is True
    overlap = meth["gene_panel"]["training_only_panel_overlap"]
    assert set(overlap) == {"P1", "P2", "P5"} and all(0 < v["shared"] <= v["of"] == 50 for v in overlap.values())
    on_disk = json.loads((trio / "results" / "trio" / "encoder_loocv_comparison.json").read_text())
    reference_reads(on_disk)


def test_copied_in_run_folders_are_summarized(tiny_cnn_features, tmp_path):
    ws, _ = tiny_cnn_features
    for fold in ("P1", "P2"):
        run_fold(
            "tiny",
            "tiny-cnn",
            fold,
            mode="random",
            decoder="linear",
            epochs=1,
            batch_size=4,
            workspace=ws,
            overwrite=True,
        )
    other = tmp_path / "colleague"
    shutil.copytree(ws / "datasets", other / "datasets")
    shutil.copytree(ws / "runs" / "tiny" / "tiny-cnn", other / "runs" / "tiny" / "tiny-cnn")
    r = CliRunner().invoke(app, ["summarize", "--dataset", "tiny", "--workspace", str(other)])
    assert r.exit_code == 0, r.output
    res = json.loads((other / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    run = res["results"]["tiny-cnn_random-linear"]
    assert set(run["fold_results"]) == {"test_P1", "test_P2"} and run["settings"]["epochs"] == 1
    assert run["fold_results"]["test_P1"]["run_dir"] == "runs/tiny/tiny-cnn/random-linear/fold-P1"


def test_one_set_of_defaults_and_run_variants(tiny_cnn_features, tmp_path):
    src, _ = tiny_cnn_features
    ws = tmp_path / "ws"
    for sub in ("datasets", "features"):
        shutil.copytree(src / sub, ws / sub)
    base = [
        "--dataset",
        "tiny",
        "--decoder",
        "linear",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--val-fraction",
        "0",
        "--device",
        "cpu",
        "--workspace",
        str(ws),
    ]
    # a fold fine-tuned alone is the same run as that fold of a LOOCV of the same settings
    r = CliRunner().invoke(
        app, ["finetune", "--encoder", "tiny-cnn", "--weights", "random:0", "--fold", "P1", *base, "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    fold = ws / "runs" / "tiny" / "tiny-cnn" / "finetune-linear" / "fold-P1"
    before = (fold / "config.json").read_bytes(), (fold / "metrics.json").read_bytes()
    r = CliRunner().invoke(
        app, ["loocv", "--encoders", "tiny-cnn", "--modes", "finetune", "--weights", "random:0", *base]
    )
    assert r.exit_code == 0, r.output
    assert ((fold / "config.json").read_bytes(), (fold / "metrics.json").read_bytes()) == before
    # other settings are refused with both ways on; a named variant trains beside the default run
    dec = ["decoder", "--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", *base]
    assert CliRunner().invoke(app, dec).exit_code == 0
    r = CliRunner().invoke(app, [*dec[:-2], "--epochs", "2", "--workspace", str(ws)])
    assert r.exit_code == 2 and "--overwrite" in r.output and "--name" in r.output
    r = CliRunner().invoke(app, [*dec, "--epochs", "2", "--name", "quick"])
    assert r.exit_code == 0, r.output
    assert (ws / "runs" / "tiny" / "tiny-cnn" / "random-linear-quick" / "fold-P2" / "metrics.json").is_file()
    res = summarize("tiny", ws)
    assert {"tiny-cnn_random-linear", "tiny-cnn_random-linear-quick"} <= set(res["results"])
    assert res["results"]["tiny-cnn_random-linear-quick"]["settings"]["epochs"] == 2


def test_reproduction_mode_trains_and_scores_as_the_reference(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="random",
        decoder="linear",
        epochs=1,
        batch_size=4,
        target="log1p-counts",
        score="all-bins",
        workspace=ws,
        overwrite=True,
    )
    assert res.run_dir.parent.name == "random-linear-counts-allbins"
    m = res.metrics
    pred = Workspace(ws).open_dataset("tiny").targets("P2")
    assert m["n_bins"] == pred.counts.shape[0] * 32 * 32  # every bin of every patch
    import xarray as xr

    stored = xr.open_zarr(res.run_dir / "predictions.zarr")
    assert np.allclose(stored.truth.values, np.log1p(pred.counts.values))  # log1p of raw counts, nothing else
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["target"] == "log1p-counts" and "log1p(raw counts)" in cfg["target_transform"]
