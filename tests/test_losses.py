"""Count losses (`--loss poisson|nb`): the likelihoods against scipy, rate recovery, dispersion, and runs whose
metrics are those of their stored target-space predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import run_fold
from scipy import stats

from featcache.stores import Workspace
from train.config import LOSS_TEXT, MAPPING_TEXT, TrainConfig
from train.data import Batches, FoldInputs, TargetTransform, load_targets, read_tokens
from train.decoder import LinearDecoder
from train.loop import Stepper, validate
from train.losses import CountHead, CountLoss, nb_nll, pack, poisson_nll, to_target
from train.metrics import evaluate, per_gene_pearson
from train.model import load_run

FAST = dict(mode="random", epochs=3, batch_size=4, lr=1e-3, seed=0, device="cpu", show_progress=False, overwrite=True)


def test_the_likelihoods_are_scipys():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.poisson(rng.gamma(0.5, 20, n)).astype(np.float64)
    log_mu = rng.normal(0.5, 2.5, n)  # μ from ~0.005 to ~1000
    log_theta = rng.normal(0.0, 2.0, n)  # θ from ~0.02 to ~50: strong to almost no overdispersion
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    mu, theta = np.exp(log_mu), np.exp(log_theta)
    want = -stats.poisson.logpmf(y, mu)
    assert np.allclose(poisson_nll(t(log_mu), t(y)).numpy(), want, rtol=1e-10, atol=1e-10)
    # torch's own Poisson NLL (log input; log y! added, which torch's `full` only approximates) is the same
    ref = torch.nn.functional.poisson_nll_loss(t(log_mu), t(y), log_input=True, full=False, reduction="none")
    assert np.allclose((ref + torch.lgamma(t(y) + 1)).numpy(), want, rtol=1e-10, atol=1e-10)
    want_nb = -stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    assert np.allclose(nb_nll(t(log_mu), t(y), t(log_theta)).numpy(), want_nb, rtol=1e-8, atol=1e-8)
    # float32 (what training computes in) stays finite and close at the extremes
    f32 = nb_nll(t(log_mu).float(), t(y).float(), t(log_theta).float()).numpy()
    assert np.isfinite(f32).all() and np.allclose(f32, want_nb, rtol=1e-4, atol=1e-3)
    # a huge θ is the Poisson limit
    big = nb_nll(t(log_mu), t(y), torch.full((n,), 20.0, dtype=torch.float64)).numpy()
    small = mu < 50
    assert np.allclose(big[small], want[small], rtol=1e-5, atol=1e-4)


def _synthetic(kind: str, theta: float, seed: int = 0, n: int = 32, genes: int = 4, channels: int = 6):
    """Features whose linear map is a known log-rate per 10k UMIs; counts drawn with varying library sizes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, channels, 32, 32)).astype(np.float32)
    w = rng.normal(0, 0.5, (genes, channels))
    log_rate = np.einsum("gc,pcrk->pgrk", w, x) + rng.uniform(4.5, 6.5, genes)[None, :, None, None]
    library = rng.lognormal(np.log(80), 0.6, (n, 32, 32)).round()
    mu = np.exp(log_rate) * library[:, None] / 1e4
    if kind == "nb":
        mu = mu * rng.gamma(theta, 1 / theta, mu.shape)
    counts = rng.poisson(mu)
    return x, log_rate, pack(counts, library), np.ones((n, 32, 32), bool)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models train fastest on one thread (two fight over a shared machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(kind: str, x, y, m, steps: int = 100, permute: np.ndarray | None = None, test_x=None):
    torch.manual_seed(0)
    genes = y.shape[1] - 1
    model = CountHead(LinearDecoder(x.shape[1], genes), genes, nb=kind == "nb")
    with torch.no_grad():
        model.log_base.fill_(5.5)
    dispersion = [model.log_theta] if kind == "nb" else []
    rest = [p for p in model.parameters() if all(p is not d for d in dispersion)]
    groups = [{"params": rest, "lr": 5e-2}] + ([{"params": dispersion, "lr": 1e-1}] if dispersion else [])
    opt = torch.optim.Adam(groups)
    cfg = TrainConfig(dataset="syn", encoder="e", fold="P1", loss=kind, batch_size=len(x))
    transform = TargetTransform("log1p-cp10k", np.zeros(genes), np.ones(genes))
    step = Stepper(model, opt, torch.device("cpu"), cfg, CountLoss(kind, transform, model))
    yy = y if permute is None else y[permute]
    losses = [step(x, yy, m, epoch, 0) for epoch in range(steps)]
    with torch.no_grad():
        fitted = model(torch.from_numpy(x if test_x is None else test_x)).numpy()
    return model, fitted, losses


def _rate_pcc(fitted, truth) -> float:
    return float(np.mean(per_gene_pearson(fitted, truth, np.ones(truth.shape[:1] + truth.shape[2:], bool))))


@pytest.mark.parametrize("kind", ["poisson", "nb"])
def test_count_losses_recover_a_known_rate_map(kind):
    """On held-out patches the fitted log-rate map correlates with the true one, far above the control trained on
    targets shuffled across patches (a derangement: no patch keeps its own)."""
    x, log_rate, y, m = _synthetic(kind, theta=4.0, n=32)
    train, test = slice(0, 16), slice(16, 32)
    _, fitted, losses = _fit(kind, x[train], y[train], m[train], test_x=x[test])
    assert losses[-1] < losses[0]
    log_rate = log_rate[test]
    shuffled = _fit(kind, x[train], y[train], m[train], permute=np.roll(np.arange(16), 1), test_x=x[test])[1]
    real, control = _rate_pcc(fitted, log_rate), _rate_pcc(shuffled, log_rate)
    print(f"{kind}: rate pcc {real:.3f}, shuffled {control:.3f}")
    assert real > 0.9 and real > control + 0.4


def test_the_nb_dispersion_is_learned():
    """On overdispersed counts (θ = 4) log θ moves from its start (0) to near log 4; on Poisson counts it grows."""
    x, _, y, m = _synthetic("nb", theta=4.0, seed=2, n=16)
    model, _, _ = _fit("nb", x, y, m, steps=120)
    learned = model.log_theta.detach().numpy()
    print("log θ learned", learned, "true", np.log(4.0))
    assert np.all(np.abs(learned - np.log(4.0)) < 0.25 * np.log(4.0))
    x, _, y, m = _synthetic("poisson", theta=0.0, seed=2, n=16)
    model, _, _ = _fit("nb", x, y, m, steps=120)
    assert np.all(model.log_theta.detach().numpy() > np.log(4.0) + 1)  # little overdispersion: a large θ


def _recomputed(run_dir):
    """Every metric from the stored pred, truth and mask, with the repo's metric functions."""
    stored = xr.open_zarr(run_dir / "predictions.zarr")
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    transform = TargetTransform.from_json(ck["transform"])
    pred, truth, mask = stored.pred.values, stored.truth.values, stored.mask.values
    return stored, ck, evaluate(pred, truth, mask, transform.target_mean, list(stored.gene.values))


@pytest.mark.parametrize(
    ("loss", "decoder", "target"), [("poisson", "linear", "log1p-counts"), ("nb", "unet", "log1p-cp10k")]
)
def test_count_loss_runs_score_their_stored_target_space_predictions(tiny_cnn_features, loss, decoder, target):
    ws, _ = tiny_cnn_features
    epochs = 2 if decoder == "unet" else 3
    res = run_fold(
        "tiny", "tiny-cnn", "P2", loss=loss, decoder=decoder, target=target, workspace=ws, **{**FAST, "epochs": epochs}
    )
    run = (
        "random"
        + ("-linear" if decoder == "linear" else "")
        + f"-{loss}"
        + ("-counts" if target != "log1p-cp10k" else "")
    )
    assert res.run_dir.parent.name == run
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert (
        cfg["loss"] == LOSS_TEXT[loss] and cfg["loss_kind"] == loss and cfg["to_target_space"] == MAPPING_TEXT[target]
    )
    assert ("dispersion_lr" in cfg) == (loss == "nb")
    m = json.loads((res.run_dir / "metrics.json").read_text())
    stored, ck, again = _recomputed(res.run_dir)
    for key in ("pcc_gene", "pcc_global", "spearman_gene", "spearman_global", "mse", "ssim_st", "n_bins"):
        assert m[key] == pytest.approx(again[key], rel=1e-9, abs=1e-12), key
    assert stored.attrs["loss"] == loss
    # pred is the model's rate mapped into target space at the training median library (never the test bins' own
    # depth, which belongs to the truth) ...
    inputs = FoldInputs(Workspace(ws).dataset("tiny"), Workspace(ws).feature_store("tiny", "tiny-cnn", random=True))
    p2 = inputs.arrays["P2"]
    idx = np.arange(len(p2.origin))
    trained = load_run(res.run_dir)
    head = trained.model.decoder
    assert isinstance(head, CountHead) and (head.log_theta is not None) == (loss == "nb")
    with torch.inference_mode():
        log_rate = head(torch.from_numpy(read_tokens(p2, "P2", idx)).float()).numpy()
    counts, library, _ = load_targets(p2, idx)
    median = ck["counts"]["median_library"]
    assert float(head.median_library) == pytest.approx(median)
    assert np.allclose(to_target(log_rate, trained.transform, predict_library=median), stored.pred.values, atol=1e-5)
    assert np.allclose(stored.log_rate.values, log_rate, atol=1e-5)  # the rates are stored beside pred
    assert np.allclose(trained.transform(counts, library), stored.truth.values)
    # ... and the reloaded model (what `featcache predict` runs) maps it with its documented exposure
    assert trained.loss == loss and ck["loss"] == loss
    assert trained.exposure["library_size"] == (median if target == "log1p-counts" else 1e4)
    images = FoldInputs(Workspace(ws).dataset("tiny"), None).arrays["P2"]
    with torch.inference_mode():
        whole = trained.model(torch.from_numpy(read_tokens(images, "P2", idx))).numpy()
    want = to_target(log_rate, trained.transform, predict_library=median)
    assert np.allclose(whole, want, atol=1e-3)
    assert np.allclose(whole, stored.pred.values, atol=1e-3)  # predict reproduces the run's own predictions
    if loss == "nb":
        assert np.abs(ck["state_dict"]["log_theta"].numpy()).max() > 0  # the dispersion was trained
        theta = np.exp(ck["state_dict"]["log_theta"].numpy())
        assert np.allclose(list(m["nb_theta"]["per_gene"].values()), theta, rtol=1e-6)
    # validation selects on target-space pcc_gene of the mapped rates
    transform = TargetTransform.from_json(ck["transform"])
    batches = Batches(inputs, {"P2": idx}, pack, 4, in_memory=True)
    objective = CountLoss(loss, transform, head)
    val_loss, val_pcc = validate(head, batches, torch.device("cpu"), objective)
    mask = stored.mask.values
    assert val_pcc == pytest.approx(np.nanmean(per_gene_pearson(stored.pred.values, stored.truth.values, mask)), 1e-5)
    assert np.isfinite(val_loss) and val_loss > 0


def test_the_loss_is_a_setting_of_every_command_and_the_comparison_file(tiny_cnn_features):
    from typer.testing import CliRunner

    from pipeline.cli import train_app as app

    # MSE runs keep the settings, record and hash they always had (hashes of the code before --loss)
    old = {
        (): "457abe792134370f7381ef08fa298816627bc9b0cd31feb9173e73e4fb8803b6",
        (("decoder", "linear"), ("target", "log1p-counts"), ("score", "all-bins")): (
            "34ad5ddd97c373e95e871a44170844d1678a8939d734529416fe661cddd24503"
        ),
        (
            ("mode", "finetune"),
            ("weights", "random:0"),
        ): "c38ef1dd31f3d6bee1475e3689470b753028dc487aca01d77673bb4df406bd4f",
    }
    for kw, digest in old.items():
        rec = TrainConfig(dataset="d", encoder="e", fold="P1", **dict(kw)).record({"dataset_fingerprint": "x"})
        assert rec["config_sha256"] == digest and "loss_kind" not in rec
    with pytest.raises(Exception, match="--loss 'gauss'"):
        TrainConfig(dataset="d", encoder="e", fold="P1", loss="gauss").validate()
    ws, _ = tiny_cnn_features
    r = CliRunner().invoke(
        app,
        [
            "loocv",
            "--encoders",
            "tiny-cnn",
            "--modes",
            "random",
            "--dataset",
            "tiny",
            "--decoder",
            "linear",
            "--loss",
            "poisson",
            "--val-fraction",
            "0",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--overwrite",
            "--workspace",
            str(ws),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    entry = res["results"]["tiny-cnn_random-linear-poisson"]
    assert entry["loss"] == "poisson" and entry["settings"]["loss"] == LOSS_TEXT["poisson"]
    assert "poisson" in res["methodology"]["loss"]
    r = CliRunner().invoke(app, ["decoder", "--help"])
    assert "--loss" in r.output


def test_featcache_predict_writes_a_count_runs_target_space_and_says_how(tiny_cnn_features, synth_dir, tmp_path):
    import anndata as ad

    from pipeline.predict import PredictOptions, predict

    ws, _ = tiny_cnn_features
    settings = {**FAST, "epochs": 2, "overwrite": False}  # the run of the test above, reused when it ran
    res = run_fold("tiny", "tiny-cnn", "P2", loss="nb", decoder="unet", target="log1p-cp10k", workspace=ws, **settings)
    out = tmp_path / "pred"
    predict(
        res.run_dir,
        synth_dir / "P2" / "P2_tissue_image.btf",
        PredictOptions(positions=synth_dir / "P2"),
        workspace=ws,
        output=out,
        device="cpu",
        show_progress=False,
    )
    z = xr.open_zarr(out / "predictions.zarr").z.values.astype(np.float32)
    pred = xr.open_zarr(res.run_dir / "predictions.zarr").pred.values
    assert np.allclose(z, pred, atol=2e-3 * np.abs(pred).max() + 1e-3)  # target space, bin for bin
    meta = json.loads((out / "prediction.json").read_text())
    assert meta["loss"] == "nb" and meta["exposure"]["library_size"] == 1e4
    uns = ad.read_h5ad(out / "predictions.h5ad").uns["featcache"]
    assert uns["loss"] == "nb" and "per 10k" in uns["exposure"]["rule"]


def test_a_finetune_run_with_a_count_loss_trains_its_dispersion_and_reloads(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="finetune",
        weights="random:0",
        decoder="linear",
        loss="nb",
        epochs=1,
        batch_size=4,
        micro_batch=2,
        lr=1e-3,
        encoder_lr=1e-3,
        workspace=ws,
        overwrite=True,
    )
    assert res.run_dir.parent.name == "finetune-randomweights-linear-nb"
    stored, ck, again = _recomputed(res.run_dir)
    assert res.metrics["pcc_gene"] == pytest.approx(again["pcc_gene"], rel=1e-9)
    assert np.abs(ck["state_dict"]["decoder.log_theta"].numpy()).max() > 0
    trained = load_run(res.run_dir)
    images = FoldInputs(Workspace(ws).dataset("tiny"), None).arrays["P2"]
    with torch.inference_mode():
        whole = trained.model(torch.from_numpy(read_tokens(images, "P2", np.arange(len(images.origin))))).numpy()
    assert np.allclose(whole, stored.pred.values, atol=1e-4)  # log1p(CP10k): predict reproduces the run


def test_a_count_loss_over_all_bins_counts_glass_too(tiny_cnn_features):
    """`--score all-bins`: glass bins (library 0, floored at 1) enter the loss and the metrics, finite."""
    ws, _ = tiny_cnn_features
    res = run_fold("tiny", "tiny-cnn", "P2", loss="poisson", decoder="linear", score="all-bins", workspace=ws, **FAST)
    assert res.run_dir.parent.name == "random-linear-poisson-allbins"
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["n_bins"] == m["n_patches"] * 32 * 32 and np.isfinite(m["pcc_gene"]) and np.isfinite(m["mse"])
    log = [json.loads(line) for line in (res.run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["train_loss"]) for row in log)


@pytest.mark.parametrize("target", ["log1p-cp10k", "log1p-counts"])
def test_a_constant_rate_scores_zero_whatever_the_bins_depth(target):
    """The scored bins' measured library sizes never enter a count run's predictions: a model that predicts one rate
    per gene everywhere is a constant prediction (pcc_gene 0), however strongly the depth drives the counts."""
    rng = np.random.default_rng(0)
    p, g = 6, 3
    library = rng.gamma(2.0, 400.0, (p, 32, 32)).astype(np.float32)
    counts = rng.poisson(library[:, None] * np.array([2e-3, 5e-3, 1e-2])[None, :, None, None]).astype(np.float32)
    mask = np.ones((p, 32, 32), bool)
    transform = TargetTransform.fit([(counts, library, mask)], target)
    head = CountHead(LinearDecoder(4, g), g, nb=False)
    head.median_library.fill_(float(np.median(library)))
    pred, truth = CountLoss("poisson", transform, head).scored(
        np.zeros((p, g, 32, 32), np.float32), pack(counts, library)
    )
    assert np.all(np.ptp(pred, axis=(0, 2, 3)) == 0)  # one value per gene
    if target == "log1p-counts":  # mapped with the measured depth instead, the same constant would score well
        leaky = to_target(np.zeros((p, g, 32, 32), np.float32), transform, library=library)
        assert np.all(per_gene_pearson(leaky, truth, mask) > 0.5)
    assert np.allclose(np.nan_to_num(per_gene_pearson(pred, truth, mask)), 0.0)
