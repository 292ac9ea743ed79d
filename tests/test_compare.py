"""`analysis compare`: a known difference between two runs is recovered, with an interval that covers it; two seed
sets of one setup are "significant" no more often than the stated 5 %; folds too small for a block bootstrap are
refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from test_bad_input import refused, snapshot
from typer.testing import CliRunner

from analysis.cli import app
from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from featcache.stores.runs import config_digest
from train.metrics import evaluate
from train.summary import summarize

NOISE = {"worse": 1.5, "better": 1.0, "also-better": 1.0}
GENES = [f"G{i}" for i in range(20)]


def expected_r(sigma: float) -> float:
    """Pearson r of t and t + noise(σ) for unit-variance t: 1 / sqrt(1 + σ²)."""
    return 1 / np.sqrt(1 + sigma**2)


def write_runs(ws, side: int = 256) -> None:
    """Three runs of a fabricated encoder on two folds of 64 patches (16 spatial blocks each): truth and noise are
    smooth in space, as real maps are, so neighbouring bins are correlated. ``side``: the extent of the patches."""
    w = Workspace(ws)
    rng = np.random.default_rng(5)
    step = side // 8
    origins = np.array([[r, c] for r in range(0, 8 * step, step) for c in range(0, 8 * step, step)])
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
            config["dataset_fingerprint"] = w.open_dataset("tiny").fingerprint  # this dataset's runs only
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
    assert gain["genes_favouring_b"] == gain["n_genes"] == len(GENES)  # descriptive; no test over genes any more
    assert not gain["training_variance_included"] and gain["se_training"] is None
    assert "excludes training variance" in " ".join(gain["notes"]) and "excludes training variance" in r.output
    same = pairs[("synthetic_better", "synthetic_also-better")]
    assert same["ci95"][0] < 0 < same["ci95"][1]  # no difference: the interval covers 0
    assert abs(same["mean_pcc_gene_difference"]) < 0.02
    assert (ws / "results" / "tiny" / "figures" / "paired_comparison.png").stat().st_size > 5000


def test_folds_with_too_few_spatial_blocks_are_refused(prepared, tmp_path):
    """Patches packed into one 64×64-bin block per fold: a bootstrap over one block gave a zero-width interval drawn
    as "excludes 0"."""
    import shutil

    src, _ = prepared
    ws = tmp_path / "ws"
    shutil.copytree(src / "datasets", ws / "datasets")
    write_runs(ws, side=32)  # 64 overlapping patches within one 64-bin block
    summarize("tiny", ws)
    args = ["compare", "--dataset", "tiny", "--runs", "synthetic_worse,synthetic_better", "--workspace", str(ws)]
    before = snapshot(ws)
    r = CliRunner().invoke(app, args)
    refused(r, "1 spatial block(s)", "needs at least 8", "--block-bins")  # one error: line, exit 2, no traceback
    assert snapshot(ws) == before, "the workspace changed"
    assert not (ws / "results" / "tiny" / "paired_comparison.json").exists()


def _simulated_fold(rng, sigma_a, sigma_b, seeds=3, side=64, block=16, genes=6, seed_spread=0.15):
    """Per-block statistics of runs A and B on one test patient, as compare computes them from predictions.

    Truth is a smooth field; both runs share a spatially varying error (what neither encoder sees) and each seed
    adds its own smooth error whose size varies from seed to seed (training variance)."""
    from analysis.compare import _stats

    smooth = lambda a: ndimage.gaussian_filter(a, (0, 1.5, 1.5))  # noqa: E731
    unit = lambda a: a / a.std()  # noqa: E731
    truth = unit(smooth(rng.normal(size=(genes, side, side))))
    shared = unit(smooth(rng.normal(size=truth.shape)))
    rows, cols = np.divmod(np.arange(side * side), side)
    blocks = (rows // block) * (side // block) + cols // block
    flat = lambda a: a.reshape(genes, -1).T  # noqa: E731
    out = []
    for sigma in (sigma_a, sigma_b):
        per_seed = []
        for _ in range(seeds):
            own = sigma * (1 + seed_spread * rng.normal()) * unit(smooth(rng.normal(size=truth.shape)))
            per_seed.append(_stats(flat(truth + 0.8 * shared + own), flat(truth), blocks))
        out.append(np.stack(per_seed))
    return tuple(out)


def test_seed_sets_of_one_setup_are_significant_no_more_often_than_stated():
    """The null: A and B are one setup, trained with other seeds. The interval excludes 0 in at most ~5 % of
    simulated comparisons (the old spatial-only interval in far more); a real difference excludes 0."""
    from analysis.compare import block_interval

    rng = np.random.default_rng(11)
    reps, ours, spatial_only = 200, 0, 0
    for _ in range(reps):
        folds = [_simulated_fold(rng, 1.2, 1.2) for _ in range(2)]
        res = block_interval(folds, 200, rng)
        assert res["training_variance_included"] and res["ci95"][0] <= res["difference"] <= res["ci95"][1]
        ours += res["ci95"][0] > 0 or res["ci95"][1] < 0
        spatial_only += abs(res["difference"]) > 1.96 * res["se_spatial"]
    print(f"excludes 0: {ours}/{reps} with training variance, {spatial_only}/{reps} with test blocks only")
    assert ours / reps <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps)  # the stated level, within simulation error
    assert spatial_only / reps > 0.2  # without the seeds' spread the null is "significant" far too often
    real = [block_interval([_simulated_fold(rng, 2.0, 1.0) for _ in range(2)], 200, rng) for _ in range(5)]
    assert all(r["ci95"][0] > 0 for r in real)


def test_seed_sets_are_read_from_config_and_paired_on_common_folds_and_seeds(tmp_path):
    """Two runs of one setup, three seeds each, listed per seed as the comparison file lists them: folders are
    identified by their config.json (where the workspace puts each seed), compared on the folds and seeds both have,
    with training variance in the interval; the interval covers 0."""
    from analysis.compare import paired_comparison

    w = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(8)
    origins = np.array([[r, c] for r in range(0, 128, 32) for c in range(0, 128, 32)])
    smooth = lambda a: ndimage.gaussian_filter(a, (0, 0, 1.5, 1.5))  # noqa: E731
    unit = lambda a: a / a.std()  # noqa: E731
    results = {}
    plan = {
        "A": {"P1": [0, 1, 2], "P2": [0, 1, 2]},
        "B": {"P1": [0, 1, 2], "P2": [0, 1], "P3": [0]},
        "D": {"P1": [0, 1, 2], "P2": [0, 1, 2]},  # a better setup: less error, seed to seed alike
    }
    sigma = {"A": 1.2, "B": 1.2, "D": 0.6}
    truths = {f: unit(smooth(rng.normal(size=(16, 8, 32, 32)))) for f in ("P1", "P2", "P3")}
    for run, folds in plan.items():
        results[run] = {"fold_results": {}}
        for fold, seeds in folds.items():
            per_seed = []
            for seed in seeds:
                truth = truths[fold] * (1 + seed) + seed  # another seed's z-score statistics: an affine change
                own = unit(smooth(rng.normal(size=truth.shape)))
                pred = truths[fold] + sigma[run] * (1 + 0.1 * rng.normal()) * own
                rd = w.run("tiny", "synthetic", run, fold, seed)
                config = {"dataset": "tiny", "encoder": "synthetic", "mode": "frozen", "run": run, "fold": fold}
                config["seed"] = seed
                config["config_sha256"] = config_digest(config)  # a consistent run folder
                rd.write_config(config)
                rd.write_predictions(
                    pred,
                    truth,
                    np.ones((16, 32, 32), bool),
                    origins,
                    np.full(16, fold),
                    GENES[:8],
                    GENES[:8],
                    {"fold": fold},
                )
                per_seed.append({"seed": seed, "run_dir": str(rd.path.relative_to(w.root))})
            results[run]["fold_results"][f"test_{fold}"] = {"per_seed": per_seed}
    results["C"] = {"fold_results": {"test_P3": results["B"]["fold_results"]["test_P3"]}}
    w.results("tiny").write_comparison({"results": results})
    with pytest.raises(FeatcacheError, match="share no fold"):
        paired_comparison("tiny", ["A", "C"], w.root, n_boot=300, block_bins=32)
    res = paired_comparison("tiny", ["A", "B"], w.root, n_boot=300, block_bins=32)
    (p,) = res["pairs"]
    assert p["folds"] == ["P1", "P2"] and p["folds_only_in_b"] == ["P3"] and "folds differ" in p["notes"][0]
    assert p["seeds"] == {"P1": [0, 1, 2], "P2": [0, 1]}
    assert "seeds differ: fold P2 compared on seeds 0, 1 (only A has 2)" in p["notes"]
    assert p["training_variance_included"] and p["se_training"] > 0 and p["dof"] is not None
    assert p["ci95"][0] < 0 < p["ci95"][1] and not p["excludes_zero"]
    # a real difference between two multi-seed runs, through the same path: found, with training variance counted
    (gain,) = paired_comparison("tiny", ["A", "D"], w.root, n_boot=300, block_bins=32)["pairs"]
    assert gain["seeds"] == {"P1": [0, 1, 2], "P2": [0, 1, 2]} and gain["training_variance_included"]
    assert gain["se_training"] > 0 and gain["excludes_zero"] and gain["ci95"][0] > 0
    lo, hi = gain["ci95"]
    assert lo < expected_r(0.6) - expected_r(1.2) < hi  # the interval covers the size of the difference
