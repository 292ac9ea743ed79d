"""The ridge head (HEST-Benchmark's protocol on our folds) and the scores at other scales (train/scales.py).

* the ridge head's predictions are an independent scikit-learn StandardScaler → PCA → Ridge fitted here on the same
  training features with the recorded α (both α rules), and its inner-fold α is the grid's best recomputed here;
* the α and the fitted model never see the test patient: scrambling its features and counts changes neither;
* pcc_gene_patch and the 16 / 32 µm scores in metrics.json are recomputed here from predictions.zarr and the
  dataset's raw counts, for a linear and a ridge run, in both target spaces.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import SMALL, run_fold
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from featcache.errors import FeatcacheError
from featcache.stores import RunDir, Workspace
from pipeline.cli import train_app as app
from train.ridge import ALPHA_GRID, load_params, predict_pooled

RIDGE = dict(mode="random", decoder="ridge", val_fraction=0.15, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def tri(synth_dir, tmp_path_factory):
    """A three-patient dataset (P1, P2 of the session, a new P3) with tiny-cnn random-init features."""
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    from featcache.synth import synthesize

    extra = tmp_path_factory.mktemp("ridge-synth")
    synthesize(extra, ["P3"], SMALL)
    ws = tmp_path_factory.mktemp("ridge-ws")
    sources = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2"), "P3": str(extra / "P3")}
    prepare_dataset("tri", sources, workspace=ws, show_progress=False)
    extract("tri", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    return ws


def _pooled(ws, dataset, sample):
    return np.asarray(Workspace(ws).feature_store(dataset, "tiny-cnn", random=True).open_sample(sample).pooled, float)


def _targets(ws, dataset, sample):
    t = Workspace(ws).dataset(dataset).targets(sample)
    return t.counts.values.astype(float), t.library_size.values.astype(float), t.mask.values.astype(bool)


def _log_cp10k(counts, library):
    return np.log1p(counts * 1e4 / np.maximum(library, 1.0)[:, None])


def _patch_targets(ws, dataset, train, test):
    """Independently: the z-scored log1p(CP10k) patch means (in-tissue bins) of the training and test patches."""
    parts = {s: _targets(ws, dataset, s) for s in train + test}
    x = {s: _log_cp10k(c, lib) for s, (c, lib, _) in parts.items()}
    bins = np.concatenate([np.moveaxis(x[s], 1, -1)[parts[s][2]] for s in train])  # (in-tissue bins, genes)
    mean, std = bins.mean(axis=0), bins.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)

    def means(s):
        z = (x[s] - mean[None, :, None, None]) / std[None, :, None, None]
        m = parts[s][2][:, None]
        return (z * m).sum(axis=(2, 3)) / m.sum(axis=(2, 3))

    return {s: means(s) for s in train + test}


def _grid_choice(xs: list, ys: list) -> float:
    """Independently: the grid's α with the best mean held-out-patient pcc_gene_patch (ties: the larger)."""
    best = None
    for a in ALPHA_GRID:
        per_fold = []
        for i in range(len(xs)):
            xtr = np.concatenate([x for j, x in enumerate(xs) if j != i])
            ytr = np.concatenate([y for j, y in enumerate(ys) if j != i])
            k = min(256, *xtr.shape)
            model = make_pipeline(StandardScaler(), PCA(k, svd_solver="full"), Ridge(alpha=a, solver="cholesky"))
            p = model.fit(xtr, ytr).predict(xs[i])
            r = [pearsonr(p[:, g], ys[i][:, g])[0] if np.ptp(p[:, g]) > 0 else 0.0 for g in range(ys[i].shape[1])]
            per_fold.append(np.mean([v for v, g in zip(r, range(len(r))) if np.ptp(ys[i][:, g]) > 0]))
        score = round(float(np.mean(per_fold)), 12)
        if best is None or score >= best[0]:
            best = (score, a)
    return best[1]


def test_ridge_predictions_are_an_independent_pca_ridge_with_the_recorded_alpha(tri):
    ws = tri
    train, test = ["P1", "P2"], ["P3"]
    y = _patch_targets(ws, "tri", train, test)
    x = {s: _pooled(ws, "tri", s) for s in train + test}
    xtr, ytr = np.concatenate([x[s] for s in train]), np.concatenate([y[s] for s in train])
    k = min(256, *xtr.shape)
    for alpha in (None, "hest"):
        res = run_fold("tri", "tiny-cnn", "P3", workspace=ws, alpha=alpha, **RIDGE)
        m, cfg = res.metrics, json.loads((res.run_dir / "config.json").read_text())
        assert cfg["decoder"] == "ridge" and "epochs" not in cfg and "lr" not in cfg
        assert not (res.run_dir / "checkpoint.pt").exists() and m["selected_epoch"] is None
        recorded = m["ridge"]["alpha"]
        if alpha == "hest":  # HEST-Benchmark: 100 / (components × genes), lsqr, no intercept
            assert res.run_dir.parent.name == "random-ridge-hestalpha" and cfg["ridge"]["solver"] == "lsqr"
            assert recorded == pytest.approx(100 / (k * ytr.shape[1]))
            reg = Ridge(alpha=recorded, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=0)
        else:  # the grid's best by inner leave-one-patient-out, recomputed here
            assert res.run_dir.parent.name == "random-ridge" and cfg["alpha_grid"] == list(ALPHA_GRID)
            assert m["ridge"]["inner_folds"] == "leave-one-patient-out over P1, P2"
            assert recorded == _grid_choice([x[s] for s in train], [y[s] for s in train])
            reg = Ridge(alpha=recorded, solver="cholesky")
        expect = make_pipeline(StandardScaler(), PCA(k, svd_solver="full"), reg).fit(xtr, ytr).predict(x["P3"])
        pred = xr.open_zarr(res.run_dir / "predictions.zarr").pred.values
        assert np.all(pred == pred[:, :, :1, :1])  # the patch's value on every bin of the patch
        # float tolerance: the run's targets are float32 (its transform's), the independent ones float64
        np.testing.assert_allclose(pred[:, :, 0, 0], expect, rtol=1e-4, atol=1e-5)
        params = load_params(RunDir(res.run_dir))  # the fitted arrays reproduce the stored predictions exactly
        np.testing.assert_allclose(predict_pooled(params, x["P3"]).astype(np.float32), pred[:, :, 0, 0], rtol=1e-6)
        assert float(params["alpha"]) == recorded


def _scramble(ws, sample: str) -> None:
    """Arbitrary features and counts for one sample, written in place (checksums rewritten by zarr)."""
    rng = np.random.default_rng(7)
    store = zarr.open_group(zarr.storage.LocalStore(ws / "features" / "tri" / "tiny-cnn-random.zarr"), mode="r+")
    pooled = store[sample]["pooled"]
    pooled[:] = rng.normal(size=pooled.shape).astype(pooled.dtype) * 50
    targets = zarr.open_group(zarr.storage.LocalStore(ws / "datasets" / "tri" / "targets.zarr"), mode="r+")
    counts = targets[sample]["counts"]
    counts[:] = rng.integers(0, 40, size=counts.shape).astype(counts.dtype)


def test_alpha_and_model_never_see_the_test_patient(tri, tiny_cnn_features, tmp_path):
    ws = tri
    before = run_fold("tri", "tiny-cnn", "P3", workspace=ws, **RIDGE)
    copy = tmp_path / "scrambled"
    for sub in ("datasets", "features"):
        shutil.copytree(ws / sub, copy / sub)
    _scramble(copy, "P3")
    after = run_fold("tri", "tiny-cnn", "P3", workspace=copy, **RIDGE)
    a, b = before.metrics["ridge"], after.metrics["ridge"]
    assert a["alpha"] == b["alpha"] and a["inner_pcc_gene_patch"] == b["inner_pcc_gene_patch"]
    pa, pb = load_params(RunDir(before.run_dir)), load_params(RunDir(after.run_dir))
    for key in ("scaler_mean", "scaler_scale", "pca_mean", "components", "coef", "intercept", "target_mean"):
        assert np.array_equal(pa[key], pb[key]), key
    assert before.metrics["pcc_gene"] != after.metrics["pcc_gene"]  # the test patient did change
    # one training patient (the two-patient dataset): inner folds of its blocks, recorded, and blind to the test too
    ws2, _ = tiny_cnn_features
    one = run_fold("tiny", "tiny-cnn", "P2", workspace=ws2, **RIDGE).metrics["ridge"]
    assert one["inner_folds"].startswith("one training patient (P1): 2 inner folds") and one["alpha"] in ALPHA_GRID


def _blocks(a, k):
    *lead, r, c = a.shape
    return a.reshape(*lead, r // k, k, c // k, k).sum(axis=(-3, -1))


def _mean_pearson(p, t):
    """Mean over genes of Pearson across rows; genes constant in the truth left out, a constant prediction 0."""
    r = [(pearsonr(p[:, g], t[:, g])[0] if np.ptp(p[:, g]) > 0 else 0.0) for g in range(t.shape[1]) if np.ptp(t[:, g])]
    return float(np.mean(r))


def _recompute(run_dir, ws, dataset, sample, mean, std, counts_target: bool) -> dict:
    ds = xr.open_zarr(run_dir / "predictions.zarr")
    pred, truth, mask = ds.pred.values.astype(float), ds.truth.values.astype(float), ds.mask.values.astype(bool)
    counts, library, m2 = _targets(ws, dataset, sample)
    assert np.array_equal(mask, m2)
    out = {}
    n = mask.sum(axis=(1, 2))[:, None]
    out["pcc_gene_patch"] = _mean_pearson(
        (pred * mask[:, None]).sum(axis=(2, 3)) / n, (truth * mask[:, None]).sum(axis=(2, 3)) / n
    )
    mean, std = np.asarray(mean)[None, :, None, None], np.asarray(std)[None, :, None, None]
    for name, k in (("pcc_gene_16um", 2), ("pcc_gene_32um", 4)):
        c = _blocks(counts * mask[:, None], k)
        lib = _blocks(library * mask, k)
        nb = _blocks(mask.astype(float), k)
        expr = np.maximum(np.expm1(pred if counts_target else pred * std + mean), 0) * mask[:, None]
        if counts_target:
            t, p = np.log1p(c), np.log1p(_blocks(expr, k))
        else:
            t = (_log_cp10k(c, lib) - mean) / std
            p = (np.log1p(_blocks(expr, k) / np.maximum(nb, 1)[:, None]) - mean) / std
        keep = nb > 0
        out[name] = _mean_pearson(np.moveaxis(p, 1, -1)[keep], np.moveaxis(t, 1, -1)[keep])
    return out


def test_patch_and_coarse_scores_recomputed_from_predictions_and_counts(tiny_cnn_features, tri):
    import torch

    ws, _ = tiny_cnn_features
    lin = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="random",
        decoder="linear",
        epochs=2,
        batch_size=4,
        lr=1e-3,
        workspace=ws,
        name="scales",  # its own folder in the session's workspace, beside other tests' linear runs
    )
    ck = torch.load(lin.run_dir / "checkpoint.pt", weights_only=True)["transform"]
    runs = [(lin, ck["mean"], ck["std"], False)]
    for target in ("log1p-cp10k", "log1p-counts"):
        r = run_fold("tri", "tiny-cnn", "P3", workspace=tri, target=target, **RIDGE)
        params = load_params(RunDir(r.run_dir))
        runs.append((r, params["target_mean"], params["target_std"], target == "log1p-counts"))
    for res, mean, std, counts_target in runs:
        sample = res.metrics["test_samples"][0]
        where = ws if res.run_dir.is_relative_to(ws) else tri
        again = _recompute(res.run_dir, where, "tiny" if where == ws else "tri", sample, mean, std, counts_target)
        stored = json.loads((res.run_dir / "metrics.json").read_text())
        for key, value in again.items():
            assert stored[key] == pytest.approx(value, abs=1e-5), (res.run_dir, key)
    # every head reports them; a ridge run's patch score is its own metric, far above its 8 µm pcc_gene here
    assert all(k in lin.metrics for k in ("pcc_gene_patch", "pcc_gene_16um", "pcc_gene_32um"))


def test_ridge_through_loocv_summarize_report_and_options(tri, tmp_path):
    ws = tmp_path / "ws"
    for sub in ("datasets", "features"):
        shutil.copytree(tri / sub, ws / sub)
    invoke = lambda *a: CliRunner().invoke(app, [*a, "--dataset", "tri", "--workspace", str(ws)])  # noqa: E731
    r = invoke("loocv", "--encoders", "tiny-cnn", "--modes", "random", "--decoder", "ridge", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads((ws / "results" / "tri" / "encoder_loocv_comparison.json").read_text())
    run = res["results"]["tiny-cnn_random-ridge"]
    assert set(run["fold_results"]) == {"test_P1", "test_P2", "test_P3"}
    for key in ("pcc_gene", "pcc_gene_patch", "pcc_gene_16um", "pcc_gene_32um"):
        assert run[key]["n"] == 3 and run[key]["mean"] is not None
    assert run["settings"]["ridge"]["alpha"] == "cv" and "epochs" not in run["settings"]
    assert all(f["per_seed"][0]["ridge_alpha"] in ALPHA_GRID for f in run["fold_results"].values())
    assert invoke("summarize").exit_code == 0
    r = CliRunner().invoke(
        app,
        [
            "decoder",
            "--fold",
            "P1",
            "--encoder",
            "tiny-cnn",
            "--mode",
            "random",
            "--decoder",
            "ridge",
            "--alpha",
            "hest",
            "--dataset",
            "tri",
            "--workspace",
            str(ws),
        ],
    )
    assert r.exit_code == 0 and "ridge α" in r.output, r.output
    from analysis.report import write_report

    page = write_report("tri", workspace=ws).read_text()
    assert "tiny-cnn_random-ridge" in page and "pcc_gene_patch" in page
    assert (ws / "results" / "tri" / "figures" / "pcc_vs_bin_size.png").is_file()
    # options a ridge run has no use for are refused, and --alpha belongs to ridge
    base = ["decoder", "--fold", "P1", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tri"]
    for extra, words in (
        (["--decoder", "ridge", "--epochs", "5"], "--epochs: no effect with --decoder ridge"),
        (["--decoder", "ridge", "--lr", "0.01"], "--lr: no effect"),
        (["--decoder", "ridge", "--alpha", "soon"], "--alpha 'soon'"),
        (["--decoder", "unet", "--alpha", "hest"], "only the ridge head has an α"),
    ):
        r = CliRunner().invoke(app, [*base, *extra, "--workspace", str(ws)])
        assert r.exit_code == 2 and words in r.output, (extra, r.output)
    from train.model import load_run

    with pytest.raises(FeatcacheError, match="is a ridge run"):
        load_run(ws / "runs" / "tri" / "tiny-cnn" / "random-ridge" / "fold-P1")
