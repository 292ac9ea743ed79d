"""`analysis report`: the page a real headless Chromium renders offline, its numbers, and the training curves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fold
from PIL import Image
from typer.testing import CliRunner

from analysis.cli import app as analysis_app
from featcache.stores import Workspace
from train.summary import summarize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",  # nothing listens there: any request to the network fails
]


@pytest.fixture(scope="module")
def workspace(tiny_cnn_features, tmp_path_factory):
    """A copy of the session workspace's dataset and features: the runs here leave the other tests' runs alone."""
    src, _ = tiny_cnn_features
    ws = tmp_path_factory.mktemp("report-ws")
    for part in ("datasets", "features"):
        shutil.copytree(src / part, ws / part)
    return ws


@pytest.fixture(scope="module")
def reported(workspace):
    """A linear-decoder run over both folds and a variant of it on one, summarized, and the report written
    through the command line (one gene's spatial maps, to keep it quick)."""
    ws = workspace
    for fold, name in (("P1", None), ("P2", None), ("P2", "b")):
        run_fold(
            "tiny",
            "tiny-cnn",
            fold,
            mode="random",
            decoder="linear",
            epochs=2,
            batch_size=4,
            seed=0,  # the random-init store the fixture extracted is random:0
            name=name,
            workspace=ws,
            overwrite=True,
        )
    summarize("tiny", ws)
    res = CliRunner().invoke(analysis_app, ["report", "--dataset", "tiny", "--genes", "EPCAM", "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
    path = Workspace.resolve(ws).results("tiny").report_path
    assert f"report: {path}" in res.output.replace("\n", "")
    return ws, path


def test_the_page_is_one_file_with_every_section(reported):
    ws, path = reported
    page = path.read_text()
    for anchor in ("comparison", "figures", "genes", "curves", "qc", "provenance"):
        assert f"id='{anchor}'" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing from elsewhere
    assert page.count("data:image/png;base64,") >= 8
    assert "featcache prepare --dataset tiny" in page and "train decoder --dataset tiny" in page
    results = Workspace.resolve(ws).results("tiny")
    for run in json.loads(results.comparison_path.read_text())["results"]:
        assert results.training_curves_path(run).is_file()
    assert not list(path.parent.glob(".*partial*"))  # written through a staged file


def test_training_curves_png_shows_both_panels(reported):
    ws, _ = reported
    png = Workspace.resolve(ws).results("tiny").training_curves_path("tiny-cnn_random-linear")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] > 2 * img.shape[0] * 0.9 and img.std() > 5


def test_a_dataset_without_results_is_refused(workspace):
    ws = workspace
    res = CliRunner().invoke(analysis_app, ["report", "--dataset", "nothing", "--workspace", str(ws)])
    assert res.exit_code != 0 and "no results file" in res.output and "train loocv" in res.output
    assert not Workspace.resolve(ws).results("nothing").report_path.exists()


def test_chromium_renders_the_page_offline_with_the_comparison_numbers(reported, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "this test needs Debian's Chromium: apt-get install -y chromium (as .ci/run does)"
    ws, path = reported
    comparison = json.loads(Workspace.resolve(ws).results("tiny").comparison_path.read_text())
    failed, requests, errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = browser.new_page()
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri(), wait_until="load")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            cells = page.eval_on_selector_all(
                "#comparison-table td[data-metric]",
                "cells => cells.map(c => [c.dataset.run, c.dataset.metric, c.textContent])",
            )
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
            # sorting is ours and works: a click on pcc_gene orders the rows by it
            page.click("#comparison-table th:nth-child(6)")
            first = page.eval_on_selector_all(
                "#comparison-table tbody tr td:nth-child(6)", "cells => cells.map(c => parseFloat(c.dataset.value))"
            )
        finally:
            browser.close()
    assert not failed and not errors, (failed, errors)
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert images and all(images)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
    shown = {(run, metric): text for run, metric, text in cells}
    assert {run for run, _ in shown} == set(comparison["results"])
    for run, r in comparison["results"].items():
        for metric in ("pcc_gene", "pearson_r", "spearman_rho", "ssim_st", "mse"):
            stat = r[metric]
            assert shown[(run, metric)] == f"{stat['mean']:.4f} ± {stat['std']:.4f}", (run, metric)
    assert first == sorted(first)


def test_incomplete_runs_are_listed_apart(reported, tmp_path):
    """A comparison file that lists incomplete runs (the newer schema) shows them outside the table."""
    ws, _ = reported
    results = Workspace.resolve(ws).results("tiny")
    saved = results.comparison_path.read_text()
    data = json.loads(saved)
    data["incomplete"] = [{"run": "tiny-cnn_frozen-linear", "missing_folds": ["P2"]}]
    try:
        results.write_comparison(data)
        from analysis.report import write_report

        page = write_report("tiny", ["EPCAM"], workspace=ws).read_text()
    finally:
        Path(results.comparison_path).write_text(saved)
    table, rest = page.split("</table>", 1)
    assert "tiny-cnn_frozen-linear" not in table and "tiny-cnn_frozen-linear" in rest.split("id='figures'")[0]
    assert "missing_folds" in rest


def test_tensorboard_events_hold_the_log(workspace):
    """`train decoder --tensorboard`: event files in the run folder with the log.jsonl numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.cli import train_app

    args = ["decoder", "--dataset", "tiny", "--encoder", "tiny-cnn", "--fold", "P1", "--mode", "random"]
    args += ["--decoder", "linear", "--epochs", "2", "--batch-size", "4", "--val-fraction", "0", "--name", "tb"]
    res = CliRunner().invoke(train_app, [*args, "--tensorboard", "--device", "cpu", "--workspace", str(workspace)])
    assert res.exit_code == 0, res.output
    run = Workspace.resolve(workspace).run("tiny", "tiny-cnn", "random-linear-tb", "P1")
    assert list(run.tensorboard_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run.tensorboard_dir))
    events.Reload()
    logged, log = events.Scalars("train/loss"), run.read_log()
    assert [s.step for s in logged] == [r["epoch"] for r in log] == [0, 1]
    assert [s.value for s in logged] == pytest.approx([r["train_loss"] for r in log], rel=1e-6)
