"""The comparison file: the reference study's keys and shapes, rebuilt from run folders (copied-in ones too),
one set of defaults for every command, run variants, and the reproduction mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SMALL, run_fold
from typer.testing import CliRunner

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from featcache.stores.runs import RunDir, config_digest
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


def finished_run(ws, encoder: str, mode: str, fold: str, draw: int, seed: int = 0, folder=None, **config) -> dict:
    """A finished run folder written through the store layer, its metrics computed on real arrays (``draw`` seeds
    them); ``config`` overrides config.json entries, ``folder`` names another folder for the same run."""
    rng = np.random.default_rng(draw)
    weights = f"random:{seed}" if mode == "random" else "sha256:abc"
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
            "features_weights": config.get("features", {}).get("identity", {}).get("weights", weights),
        }
    )
    run = RunDir(folder) if folder else Workspace(ws).run("trio", encoder, mode, fold, seed)
    run.write_config(
        {
            "dataset": "trio",
            "dataset_fingerprint": Workspace(ws).open_dataset("trio").fingerprint,
            "features": {"store": encoder, "identity": {"encoder": encoder, "weights": weights}},
            "encoder": encoder,
            "mode": mode,
            "run": mode,
            "fold": fold,
            "epochs": 200,
            "batch_size": 64,
            "lr": 1e-4,
            "seed": seed,
            "target": "log1p-cp10k",
            "score": "in-tissue",
            "train_samples": [p for p in ("P1", "P2", "P5") if p != fold],
            "config_sha256": str(draw),
            **config,
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
    fold = ws / "runs" / "tiny" / "tiny-cnn" / "finetune-randomweights-linear" / "fold-P1"  # from random weights
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
    # fine-tuning from random weights is its own run, never the reference's densenet_finetuned-style key
    assert set(res["results"]) == {"tiny-cnn_finetune-randomweights-linear"}
    assert res["results"]["tiny-cnn_finetune-randomweights-linear"]["default_protocol"] is False
    # one fold of two: listed as incomplete with the reason, outside results
    for key in ("tiny-cnn_random-linear", "tiny-cnn_random-linear-quick"):
        assert res["incomplete"][key]["folds"] == ["P2"] and "missing P1" in res["incomplete"][key]["reason"]


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


def _strict(text: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_only_complete_comparable_runs_of_this_dataset_enter_results(trio, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trio / "datasets", ws / "datasets")
    folds = ("P1", "P2", "P5")
    for seed in (0, 1):  # complete, two seeds
        for j, f in enumerate(folds):
            finished_run(ws, "uni2h", "frozen", f, 10 * seed + j, seed=seed)
    finished_run(ws, "virchow2", "frozen", "P1", 40)  # one fold
    for j, f in enumerate(folds):  # an earlier preparation of the dataset, with the best score of all
        finished_run(ws, "hoptimus0", "frozen", f, 50 + j, dataset_fingerprint="0" * 64)
        rd = Workspace(ws).run("trio", "hoptimus0", "frozen", f)
        rd.write_metrics({**rd.read_metrics(), "pcc_gene": 0.99})
    for j, f in enumerate(folds):  # each fold from another random-init store
        finished_run(ws, "densenet121", "random", f, 60 + j, features={"identity": {"weights": f"random:{j}"}})
    for j, f in enumerate(folds):  # one fold trained with other settings
        finished_run(ws, "densenet121", "frozen", f, 70 + j, epochs=50 if f == "P5" else 200)
    for j, f in enumerate(folds):  # frozen by name, random-init by what it read (a store made with random weights)
        finished_run(ws, "conch15", "frozen", f, 100 + j, features={"identity": {"weights": "random:0"}})
    for j, f in enumerate(folds):  # fine-tuned from random weights under the pretrained fine-tune's key
        finished_run(ws, "densenet121", "finetune", f, 110 + j, encoder_weights="random:0", features={})
    for seed in (0, 1):  # seed 1 of a random-init run copied from folders that read seed 0's random encoder
        for j, f in enumerate(folds):
            finished_run(
                ws, "uni2h", "random", f, 80 + 3 * seed + j, seed=seed, features={"identity": {"weights": "random:0"}}
            )

    res = summarize("trio", ws)
    assert set(res["results"]) == {"uni2h_frozen"}
    assert res["about"]["best_by_pcc_gene"] == "uni2h_frozen" and res["about"]["runs"] == ["uni2h_frozen"]
    assert set(res["summary"]) == {"UNI2-h"}
    assert "seed 0 has 1 of 3 folds (missing P2, P5)" in res["incomplete"]["virchow2_frozen"]["reason"]
    assert sorted(f["run_dir"] for f in res["foreign"]) == [f"runs/trio/hoptimus0/frozen/fold-{f}" for f in folds]
    assert all("dataset fingerprint" in f["reason"] for f in res["foreign"])
    assert set(res["inconsistent"]) == {
        "densenet_random_init",
        "densenet_frozen",
        "uni2h_random",
        "conch15_frozen",
        "densenet_finetuned",
    }
    assert (
        "says mode frozen but read random-init features (random:0)" in res["inconsistent"]["conch15_frozen"]["reason"]
    )
    assert "--mode random" in res["inconsistent"]["conch15_frozen"]["reason"]
    assert "fine-tuned from random weights (random:0)" in res["inconsistent"]["densenet_finetuned"]["reason"]
    assert (
        "seed 1 of a random-init run but read random:0 features, not random:1"
        in (res["inconsistent"]["uni2h_random"]["reason"])
    )
    assert "different weights (random:0, random:1, random:2)" in res["inconsistent"]["densenet_random_init"]["reason"]
    assert "epochs" in res["inconsistent"]["densenet_frozen"]["reason"]
    # the complete run: per fold the mean over its seeds, each seed listed; spread over folds and over seeds
    run = res["results"]["uni2h_frozen"]
    assert run["seeds"] == [0, 1] and run["settings"]["seeds"] == [0, 1]
    for f in folds:
        entry = run["fold_results"][f"test_{f}"]
        assert [e["seed"] for e in entry["per_seed"]] == [0, 1]
        assert entry["per_seed"][1]["run_dir"] == f"runs/trio/uni2h/frozen/fold-{f}-seed1"
        assert entry["pcc_gene"] == pytest.approx(np.mean([e["pcc_gene"] for e in entry["per_seed"]]))
    values = [run["fold_results"][f"test_{f}"]["pcc_gene"] for f in folds]
    assert run["pcc_gene"]["mean"] == pytest.approx(np.mean(values))
    assert run["pcc_gene"]["std"] == pytest.approx(np.std(values, ddof=0))
    seed_means = [np.mean([run["fold_results"][f"test_{f}"]["per_seed"][k]["pcc_gene"] for f in folds]) for k in (0, 1)]
    assert run["pcc_gene"]["std_over_seeds"] == pytest.approx(np.std(seed_means))
    assert res["methodology"]["std_ddof"] == 0 and "ddof 0" in res["methodology"]["std"]
    # the floor (the training-mean prediction) beside every metric, per fold and over folds
    assert run["fold_results"]["test_P1"]["floor"] == {"mse": 1.0, "pcc_gene": 0.0}
    assert run["floor"]["mse"] == {"mean": 1.0, "std": 0.0, "n": 3} and run["floor"]["pcc_gene"]["mean"] == 0.0
    _strict((ws / "results" / "trio" / "encoder_loocv_comparison.json").read_text())
    # a fold copied in a second time, beside the first: its folder does not say its fold, so it is refused by name
    finished_run(ws, "uni2h", "frozen", "P1", 90, folder=ws / "runs" / "trio" / "uni2h" / "frozen" / "fold-P1-copy")
    with pytest.raises(FeatcacheError, match="fold-P1-copy"):
        summarize("trio", ws)


def test_non_finite_metrics_are_refused_and_nothing_is_written(trio, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trio / "datasets", ws / "datasets")
    for j, f in enumerate(("P1", "P2", "P5")):
        finished_run(ws, "uni2h", "frozen", f, j)
    rd = Workspace(ws).run("trio", "uni2h", "frozen", "P2")  # a NaN token the writer recorded, and hashed
    rd.write_metrics({**rd.read_metrics(), "pcc_gene": float("nan")})  # (a hand-edited one: metrics_sha256)
    assert "NaN" in rd.file("metrics.json").read_text()
    r = CliRunner().invoke(app, ["summarize", "--dataset", "trio", "--workspace", str(ws)])
    assert r.exit_code != 0 and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert "non-finite" in r.output and "pcc_gene" in r.output and "fold-P2" in r.output
    assert not (ws / "results" / "trio" / "encoder_loocv_comparison.json").exists()


def test_an_unfinished_fold_is_listed_as_unfinished_not_missing(trio, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trio / "datasets", ws / "datasets")
    for j, f in enumerate(("P1", "P2", "P5")):
        finished_run(ws, "uni2h", "frozen", f, j)
    unfinished = Workspace(ws).run("trio", "uni2h", "frozen", "P2")
    unfinished.file("metrics.json").unlink()  # still training, or killed: config.json but no metrics.json
    finished_run(ws, "virchow2", "frozen", "P1", 9)
    Workspace(ws).run("trio", "virchow2", "frozen", "P1").file("metrics.json").unlink()  # no fold finished yet
    r = CliRunner().invoke(app, ["summarize", "--dataset", "trio", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if "uni2h_frozen" in ln and "not in results" in ln)
    assert "missing P2" in line and f"unfinished (no metrics.json): {unfinished.path.relative_to(ws)}" in line
    res = json.loads((ws / "results" / "trio" / "encoder_loocv_comparison.json").read_text())
    assert (
        "unfinished (no metrics.json): runs/trio/virchow2/frozen/fold-P1"
        in res["incomplete"]["virchow2_frozen"]["reason"]
    )
    assert res["results"] == {}


def test_lr_grid_same_budget_for_every_encoder_chosen_on_validation(trio, tmp_path):
    from train.loocv import loocv_configs

    configs = loocv_configs("trio", ["uni2h", "virchow2"], ["frozen"], ["P1", "P2", "P5"], {"lr_grid": [1e-3, 1e-4]})
    assert len(configs) == 2 * 2 * 3  # every encoder the same trials
    assert {c.run_name for c in configs} == {"frozen-lrgrid"} and {c.lr for c in configs} == {1e-4, 1e-3}
    w = Workspace(tmp_path / "ws")
    folders = {w.run(c.dataset, c.encoder, c.run_name, c.fold, c.seed, c.trial_lr).path for c in configs}
    assert len(folders) == len(configs)
    ws = tmp_path / "ws"
    shutil.copytree(trio / "datasets", ws / "datasets")
    val = {1e-4: 0.30, 1e-3: 0.10}  # 1e-4 validates better on every fold
    for j, f in enumerate(("P1", "P2", "P5")):
        for lr in (1e-4, 1e-3):
            rd = Workspace(ws).run("trio", "uni2h", "frozen-lrgrid", f, 0, lr)
            finished_run(ws, "uni2h", "frozen", f, j, folder=rd.path, run="frozen-lrgrid", lr=lr, lr_grid=[1e-4, 1e-3])
            m = rd.read_metrics()
            rd.write_metrics({**m, "val_pcc_gene": val[lr], "pcc_gene": 0.9 if lr == 1e-3 else m["pcc_gene"]})
    res = summarize("trio", ws)
    run = res["results"]["uni2h_frozen-lrgrid"]
    for f in ("P1", "P2", "P5"):
        entry = run["fold_results"][f"test_{f}"]
        assert entry["lr_selected"] == [1e-4]  # chosen on validation, never on the test patient's 0.9
        assert entry["pcc_gene"] != 0.9 and entry["per_seed"][0]["run_dir"].endswith(f"fold-{f}-lr0.0001")
