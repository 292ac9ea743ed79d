"""`analysis report`: the page a real headless Chromium renders offline, its numbers, and the training curves."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fold
from PIL import Image
from typer.testing import CliRunner

from analysis.cli import app as analysis_app
from analysis.curves import curve_data, loss_label
from analysis.report import METRICS, PAGE, SCRIPT, STYLE, _genes_section
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
    """Two complete linear-decoder runs over both folds (one with seeds 0 and 1, a variant at another lr with
    seed 0), summarized, and the report written through the command line (one gene's maps, to keep it quick)."""
    from featcache.extract import ExtractionConfig, extract

    ws = workspace
    # the random-init run's seed 1 trains on its own random encoder's features, random:1
    extract("tiny", ExtractionConfig("tiny-cnn", "random:1"), workspace=ws, show_progress=False)
    for fold, seed, name, lr in (
        ("P1", 0, None, 1e-4),
        ("P2", 0, None, 1e-4),
        ("P1", 1, None, 1e-4),
        ("P2", 1, None, 1e-4),
        ("P1", 0, "b", 3e-3),
        ("P2", 0, "b", 3e-3),
    ):
        run_fold(
            "tiny",
            "tiny-cnn",
            fold,
            mode="random",
            decoder="linear",
            epochs=2,
            batch_size=4,
            seed=seed,
            lr=lr,
            name=name,
            workspace=ws,
            overwrite=True,
        )
    summarize("tiny", ws)
    runs = "tiny-cnn_random-linear,tiny-cnn_random-linear-b"
    args = ["compare", "--dataset", "tiny", "--runs", runs, "--block-bins", "16", "--bootstrap", "200"]
    res = CliRunner().invoke(analysis_app, [*args, "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
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
    # the spread over seeds beside the spread over folds (the run with seeds 0 and 1)
    seeded = json.loads(results.comparison_path.read_text())["results"]["tiny-cnn_random-linear"]["pcc_gene"]
    table = page.split("id='comparison-table'")[1].split("</table>")[0]
    assert "pcc_gene std over seeds" in table and f">{seeded['std_over_seeds']:.4f}<" in table
    assert not list(path.parent.glob(".*partial*"))  # written through a staged file
    # the paired comparison: its interval, whether training variance is in it (these runs share one seed), and no
    # test over genes (a "Wilcoxon p" column was left blank once compare stopped making that test)
    table = page.split("id='paired-table'")[1].split("</table>")[0]
    (pair,) = json.loads(results.paired_path.read_text())["pairs"]
    assert "training variance" in table and "excluded (one seed)" in table and "Wilcoxon" not in page
    assert f"[{pair['ci95'][0]:.4f}, {pair['ci95'][1]:.4f}]" in table


def test_training_curves_png_shows_both_panels(reported):
    ws, _ = reported
    png = Workspace.resolve(ws).results("tiny").training_curves_path("tiny-cnn_random-linear")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] > 2 * img.shape[0] * 0.9 and img.std() > 5


def test_the_curves_ring_each_seeds_selected_epoch(reported):
    """curve_data reads every seed's run folder, each with the epoch its own metrics.json says it kept."""
    ws, path = reported
    w = Workspace.resolve(ws)
    runs = json.loads(w.results("tiny").comparison_path.read_text())["results"]
    assert set(runs) == {"tiny-cnn_random-linear", "tiny-cnn_random-linear-b"}  # both complete
    assert runs["tiny-cnn_random-linear"]["seeds"] == [0, 1]
    for r in runs.values():
        curves = curve_data(w, r)
        assert set(curves) == {"P1", "P2"}
        for fold, by_seed in curves.items():
            assert sorted(by_seed) == r["seeds"]
            for seed, c in by_seed.items():
                rd = w.run("tiny", "tiny-cnn", r["run"], fold, seed=seed)
                assert c["selected"] is not None and c["selected"] == rd.read_metrics()["selected_epoch"]
                assert c["epoch"] == [e["epoch"] for e in rd.read_log()]
                assert c["train_loss"] == [e["train_loss"] for e in rd.read_log()]
    assert loss_label(runs["tiny-cnn_random-linear"]["loss"]) == "training loss (masked MSE)"
    assert loss_label("poisson") == "training loss (Poisson NLL)" and loss_label("nb") == "training loss (NB NLL)"
    assert "seed 0 of every run" in path.read_text()  # the maps say whose folder they are from


def test_a_dataset_without_results_is_refused(workspace):
    ws = workspace
    res = CliRunner().invoke(analysis_app, ["report", "--dataset", "nothing", "--workspace", str(ws)])
    assert res.exit_code != 0 and "no results file" in res.output and "train loocv" in res.output
    assert not Workspace.resolve(ws).results("nothing").report_path.exists()


@contextmanager
def _browser(tmp_path):
    """A headless Chromium page with the network cut; yields (page, failed requests, all requests, page errors)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "this test needs Debian's Chromium: apt-get install -y chromium (as .ci/run does)"
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
            yield page, failed, requests, errors
        finally:
            browser.close()


def _column(page, table: str, col: int) -> list[str]:
    """The data-value of column ``col`` (1-based) of every row of ``table``, in the order shown."""
    return page.eval_on_selector_all(
        f"#{table} tbody tr td:nth-child({col})", "cells => cells.map(c => c.dataset.value)"
    )


def _key(v) -> tuple:
    """Ascending order with missing and NaN values last, as the page's sort does."""
    return (True, 0.0) if v is None or not np.isfinite(v) else (False, v)


def test_chromium_renders_the_page_offline_with_the_comparison_numbers(reported, tmp_path):
    ws, path = reported
    comparison = json.loads(Workspace.resolve(ws).results("tiny").comparison_path.read_text())
    runs = comparison["results"]
    heads = ["run", "encoder", "mode", "variant", "seeds", *METRICS]
    with _browser(tmp_path) as (page, failed, requests, errors):
        page.goto(path.as_uri(), wait_until="load")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        cells = page.eval_on_selector_all(
            "#comparison-table td[data-metric]",
            "cells => cells.map(c => [c.dataset.run, c.dataset.metric, c.textContent, c.dataset.value])",
        )
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        # sorting is ours and works: pcc_gene ascending on the first click, descending on the second
        pcc = heads.index("pcc_gene") + 1
        order, sort_state = [], []
        for _ in range(2):
            page.click(f"#comparison-table th:nth-child({pcc})")
            order.append(_column(page, "comparison-table", 1))
            sort_state.append(page.get_attribute(f"#comparison-table th:nth-child({pcc})", "aria-sort"))
        # the per-gene table by the second run's column (gene, category, then one column per run)
        names = list(runs)
        page.click(f"#gene-table th:nth-child({3 + names.index(names[1])})")
        genes = _column(page, "gene-table", 1)
    assert not failed and not errors, (failed, errors)
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert images and all(images)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
    shown = {(run, metric): (text, value) for run, metric, text, value in cells}
    assert {run for run, _ in shown} == set(runs) and len(runs) == 2
    for run, r in runs.items():
        for metric in METRICS:
            stat = r[metric]
            text, value = shown[(run, metric)]
            assert text == f"{stat['mean']:.4f} ± {stat['std']:.4f}", (run, metric)
            assert float(value) == stat["mean"], (run, metric)
    ascending = sorted(runs, key=lambda n: runs[n]["pcc_gene"]["mean"])
    assert runs[ascending[0]]["pcc_gene"]["mean"] < runs[ascending[1]]["pcc_gene"]["mean"]
    assert order == [ascending, ascending[::-1]] and sort_state == ["ascending", "descending"]
    per_gene = runs[names[1]]["per_gene_pcc"]
    assert sorted(genes) == sorted(per_gene)
    assert [_key(per_gene[g]) for g in genes] == sorted(_key(v) for v in per_gene.values())


def test_nan_per_gene_values_show_a_dash_and_sort_last(reported, tmp_path):
    """A gene whose per-gene PCC is NaN (or missing) shows "—" and sorts last both ways in a real browser."""
    ws, _ = reported
    runs = json.loads(Workspace.resolve(ws).results("tiny").comparison_path.read_text())["results"]
    name = next(iter(runs))
    panel = list(runs[name]["per_gene_pcc"])
    runs[name]["per_gene_pcc"][panel[0]] = float("nan")
    runs[name]["per_gene_pcc"][panel[1]] = None
    body = _genes_section(runs, {})
    assert "data-value='nan'" not in body
    page_path = tmp_path / "genes.html"
    page_path.write_text(PAGE.format(title="genes", style=STYLE, script=SCRIPT).replace("<!--BODY-->", body))
    shown = []
    with _browser(tmp_path) as (page, failed, _, errors):
        page.goto(page_path.as_uri(), wait_until="load")
        for _ in range(2):
            page.click("#gene-table th:nth-child(3)")
            shown.append(
                page.eval_on_selector_all(
                    "#gene-table tbody tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[2].textContent])"
                )
            )
    assert not failed and not errors, (failed, errors)
    values = {g: v for g, v in runs[name]["per_gene_pcc"].items() if g not in panel[:2]}
    for rows, descending in zip(shown, (False, True)):
        assert {g for g, _ in rows[-2:]} == set(panel[:2]) and all(t == "—" for _, t in rows[-2:])
        finite = [g for g, _ in rows[:-2]]
        assert [values[g] for g in finite] == sorted(values.values(), reverse=descending)


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
