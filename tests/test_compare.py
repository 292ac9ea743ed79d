"""`analysis compare`: a known difference between two runs is recovered, with an interval that covers it."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage
from typer.testing import CliRunner

from analysis.cli import app
from featcache.stores import Workspace
from featcache.stores.runs import config_digest
from train.metrics import evaluate
from train.summary import summarize

NOISE = {"worse": 1.5, "better": 1.0, "also-better": 1.0}
GENES = [f"G{i}" for i in range(20)]


def expected_r(sigma: float) -> float:
    """Pearson r of t and t + noise(σ) for unit-variance t: 1 / sqrt(1 + σ²)."""
    return 1 / np.sqrt(1 + sigma**2)


def write_runs(ws) -> None:
    """Three runs of a fabricated encoder on two folds of 64 patches (16 spatial blocks each): truth and noise are
    smooth in space, as real maps are, so neighbouring bins are correlated."""
    w = Workspace(ws)
    rng = np.random.default_rng(5)
    origins = np.array([[r, c] for r in range(0, 256, 32) for c in range(0, 256, 32)])
    smooth = lambda a: ndimage.gaussian_filter(a, (0, 0, 1.5, 1.5))  # noqa: E731
    for fold in ("P1", "P2"):
        truth = smooth(rng.normal(size=(64, len(GENES), 32, 32)))
        truth /= truth.std()
        mask = np.ones((64, 32, 32), bool)
        for name, sigma in NOISE.items():
            noise = smooth(rng.normal(size=truth.shape))
            pred = truth + sigma * noise / noise.std()
            rd = w.run("tiny", "synthetic", name, fold)
            config = {"dataset": "tiny", "encoder": "synthetic", "mode": "frozen", "run": name, "fold": fold}
            config["config_sha256"] = config_digest(config)  # a consistent run folder (RunDir.verified_config)
            rd.write_config(config)
            m = evaluate(pred, truth, mask, np.zeros(len(GENES)), GENES)
            m["config_sha256"] = config["config_sha256"]
            rd.write_metrics({**m, "baselines": {"per_gene_mean": {"mse": 1.0}}, "test_samples": [fold]})
            rd.write_predictions(pred, truth, mask, origins, np.full(64, fold), GENES, GENES, {"fold": fold})


def test_known_difference_recovered_with_covering_interval(prepared, tmp_path):
    src, _ = prepared
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(src / "datasets", ws / "datasets")
    write_runs(ws)
    summarize("tiny", ws)
    runs = "synthetic_worse,synthetic_better,synthetic_also-better"
    r = CliRunner().invoke(
        app, ["compare", "--dataset", "tiny", "--runs", runs, "--bootstrap", "1000", "--workspace", str(ws)]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((ws / "results" / "tiny" / "paired_comparison.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    known = expected_r(NOISE["better"]) - expected_r(NOISE["worse"])  # 0.152
    gain = pairs[("synthetic_worse", "synthetic_better")]  # B − A = better − worse
    lo, hi = gain["ci95"]
    assert lo < known < hi and lo > 0  # the interval covers the true difference and excludes 0
    assert gain["wilcoxon"]["p_value"] < 0.01 and gain["genes_favouring_b"] == gain["n_genes"] == len(GENES)
    same = pairs[("synthetic_better", "synthetic_also-better")]
    assert same["ci95"][0] < 0 < same["ci95"][1]  # no difference: the interval covers 0
    assert abs(same["mean_pcc_gene_difference"]) < 0.02
    assert (ws / "results" / "tiny" / "figures" / "paired_comparison.png").stat().st_size > 5000
