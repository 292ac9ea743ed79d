"""The Python API refuses what the command line refuses.

Every check lives in the function a command calls, so the commands are plain adapters: for each
check, the command's one `error:` line is the message the Python function raises, word for word,
and nothing is written. Each case is refused before any real work, so these tests are cheap.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from analysis.cli import app as analysis_app
from featcache.errors import FeatcacheError
from pipeline.cli import featcache_app, train_app


def cli_error(app, *args) -> str:
    """The one `error:` line of a refused command (exit code 2, no traceback), without its prefix."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0].removeprefix("error: ")


def api_error(call) -> str:
    with pytest.raises(FeatcacheError) as info:
        call()
    return str(info.value)


def same_refusal(cli: str, api: str, needle: str) -> None:
    assert cli == api and needle in api, (cli, api)


# --------------------------------------------------------------------------- synth
def test_synth_sections_and_missing_genes_are_checked_by_the_library(tmp_path):
    from featcache.synth import plan_samples, synthesize

    out = tmp_path / "raw"
    same_refusal(
        cli_error(featcache_app, "synth", out, "--sections", "0"),
        api_error(lambda: plan_samples(["P1"], sections=0)),
        "--sections 0",
    )
    same_refusal(
        cli_error(featcache_app, "synth", out, "--samples", "P1", "--missing-genes", "P1=x"),
        api_error(lambda: plan_samples(["P1"], missing_genes=["P1=x"])),
        "N must be an integer",
    )
    same_refusal(
        cli_error(featcache_app, "synth", out, "--samples", "A", "--missing-genes", "B=3"),
        api_error(lambda: synthesize(out, ["A"], per_sample={"B": {"missing_genes": 3}})),
        "which is not a sample",
    )
    assert not out.exists()


def test_synth_plan_names_sections_after_their_patient():
    from featcache.synth import plan_samples

    plan = plan_samples(["A", "B"], sections=2, missing_genes=["B-s2=5"])
    assert plan.names == ["A-s1", "A-s2", "B-s1", "B-s2"]
    assert plan.patients == {"A-s1": "A", "A-s2": "A", "B-s1": "B", "B-s2": "B"}
    assert plan.per_sample == {"B-s2": {"missing_genes": 5}}
    assert plan_samples(["A"]).patients is None  # one section each: no manifest


# --------------------------------------------------------------------------- prepare
def test_prepare_options_are_parsed_by_the_library(tmp_path):
    from featcache.prepare import inputs_from_options

    same_refusal(
        cli_error(featcache_app, "prepare", "--dataset", "d", "--sample", "P1", "--workspace", tmp_path / "ws"),
        api_error(lambda: inputs_from_options(["P1"], None, None, None)),
        "expected NAME=VALUE",
    )
    inputs = inputs_from_options(["P1=/a", "P2=/b"], ["P1=/a.tif"], ["P2=X"], None)
    assert inputs.samples == {"P1": "/a", "P2": "/b"} and inputs.images == {"P1": "/a.tif"}
    assert inputs.patients == {"P2": "X"}


# --------------------------------------------------------------------------- encoders and extract
def test_encoders_lists_what_the_library_reports():
    from featcache.weights import encoder_overview

    r = CliRunner().invoke(featcache_app, ["encoders", "--json"])
    assert r.exit_code == 0, r.output
    rows = encoder_overview()
    assert json.loads(r.output) == rows
    assert {r["encoder"]: r["weights"] for r in rows}["tiny-cnn"] == "random only"


def test_extraction_config_and_runtime_refuse_bad_values(tmp_path):
    from featcache.extract import ExtractionConfig, extract

    ws = tmp_path / "ws"
    base = ("extract", "--encoder", "tiny-cnn", "--weights", "random:0", "--dataset", "nope", "--workspace", ws)
    same_refusal(
        cli_error(featcache_app, *base, "--precision", "fp8"),
        api_error(lambda: ExtractionConfig("tiny-cnn", "random:0", precision="fp8")),
        "--precision",
    )
    same_refusal(
        cli_error(featcache_app, *base, "--chunk-patches", "0"),
        api_error(lambda: ExtractionConfig("tiny-cnn", "random:0", chunk_patches=0)),
        "--chunk-patches",
    )
    same_refusal(  # before the dataset is even looked for
        cli_error(featcache_app, *base, "--batch-size", "0"),
        api_error(lambda: extract("nope", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, batch_size=0)),
        "--batch-size 0",
    )
    assert not ws.exists()


def test_every_encoders_weights_are_found_before_any_work(tmp_path, monkeypatch):
    from featcache.extract import ExtractionConfig, extract_each, extraction_configs

    monkeypatch.delenv("FEATCACHE_WEIGHTS", raising=False)
    ws = tmp_path / "ws"
    # were the work started first, the missing dataset would be the complaint
    same_refusal(
        cli_error(featcache_app, "extract", "--encoder", "all", "--dataset", "nope", "--workspace", ws),
        api_error(lambda: extract_each("nope", extraction_configs("all"), workspace=ws)),
        "no weights found",
    )
    configs = [ExtractionConfig("tiny-cnn", "random:0"), ExtractionConfig("uni2h")]
    assert "uni2h" in api_error(lambda: extract_each("nope", configs, workspace=ws))
    assert not ws.exists()


def test_one_output_store_for_several_encoders_is_refused(tmp_path):
    from featcache.extract import extract_each, extraction_configs

    ws, store = tmp_path / "ws", tmp_path / "one.zarr"
    same_refusal(
        cli_error(featcache_app, "extract", "--encoder", "all", "--output", store, "--workspace", ws),
        api_error(lambda: extract_each("demo", extraction_configs("all"), workspace=ws, output=str(store))),
        "--output names one store",
    )
    assert not store.exists() and not ws.exists()


# --------------------------------------------------------------------------- predict
def test_predict_options_are_checked_by_predict(tmp_path):
    from pipeline.predict import PredictOptions, predict

    run, image = tmp_path / "run", tmp_path / "slide.png"
    base = ("predict", "--run", run, "--image", image, "--workspace", tmp_path / "ws")
    same_refusal(
        cli_error(featcache_app, *base, "--min-tissue", "1.5"),
        api_error(lambda: predict(run, image, PredictOptions(min_tissue=1.5))),
        "--min-tissue 1.5",
    )
    same_refusal(
        cli_error(featcache_app, *base, "--batch-size", "0"),
        api_error(lambda: predict(run, image, batch_size=0)),
        "--batch-size",
    )
    with pytest.raises(FeatcacheError, match="stride 0"):
        PredictOptions(stride=0)


# --------------------------------------------------------------------------- train and analysis
def test_train_decoder_without_encoder_asks_the_library_for_complete_stores(tmp_path):
    from train.loocv import encoders_with_features

    ws = tmp_path / "ws"
    same_refusal(
        cli_error(train_app, "decoder", "--fold", "P1", "--dataset", "tiny", "--workspace", ws),
        api_error(lambda: encoders_with_features("tiny", "frozen", ws)),
        "no complete feature store",
    )


def test_compare_bootstrap_is_checked_by_paired_comparison(tmp_path):
    from analysis.compare import paired_comparison

    ws = tmp_path / "ws"
    same_refusal(
        cli_error(analysis_app, "compare", "--bootstrap", "50", "--workspace", ws),
        api_error(lambda: paired_comparison("demo", workspace=ws, n_boot=50)),
        "--bootstrap 50",
    )
