"""The decoder stage: architecture, metrics vs scipy/scikit-image, splits, training runs, LOOCV."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from conftest import run_fold
from typer.testing import CliRunner

from featcache.stores import Workspace
from pipeline.cli import train_app as app
from train.data import FoldInputs, TargetTransform, blocked_split, load_targets
from train.decoder import LinearDecoder, MiniUNet

FAST = dict(
    decoder="linear", epochs=3, batch_size=4, lr=1e-3, seed=0, device="cpu", show_progress=False, overwrite=True
)


def test_miniunet_shapes_params_and_init():
    unet = MiniUNet(1024, 50)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(19.2e6, rel=0.005)
    assert unet(torch.zeros(2, 1024, 14, 14)).shape == (2, 50, 32, 32)  # CNN grid resized to 32
    assert MiniUNet(48, 7)(torch.zeros(1, 48, 32, 32)).shape == (1, 7, 32, 32)
    assert LinearDecoder(96, 5)(torch.zeros(3, 96, 14, 14)).shape == (3, 5, 32, 32)
    bns = [m for m in unet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None or torch.all(c.bias == 0) for c in convs)
    assert convs[0].bias is None and convs[-1].bias is not None  # ConvBlock convs have no bias; the head does


def test_blocked_split_is_spatial_and_seeded():
    origins = {
        "A": np.array([[r, c] for r in range(0, 256, 32) for c in range(0, 256, 32)]),
        "B": np.array([[r, c] for r in range(0, 128, 32) for c in range(0, 128, 32)]),
    }
    tr, va = blocked_split(origins, 0.2, seed=3)
    tr2, va2 = blocked_split(origins, 0.2, seed=3)
    assert all(np.array_equal(va[s], va2[s]) for s in origins)
    total = sum(len(o) for o in origins.values())
    assert 0.15 * total <= sum(len(v) for v in va.values()) <= 0.3 * total
    for s, o in origins.items():
        assert not set(tr[s]) & set(va[s])
        val_blocks = {(r // 64, c // 64) for r, c in o[va[s]]}
        train_blocks = {(r // 64, c // 64) for r, c in o[tr[s]]}
        assert not val_blocks & train_blocks  # whole 64×64-bin blocks
        # a one-patch buffer: no training patch comes within 32 bins (edge to edge) of a validation patch ...
        gap = [np.abs(o[t] - o[v]).max() - 32 for t in tr[s] for v in va[s]]
        assert not gap or min(gap) >= 32
        # ... and only those are left out
        left_out = set(range(len(o))) - set(tr[s]) - set(va[s])
        assert all(min(np.abs(o[k] - o[v]).max() for v in va[s]) - 32 < 32 for k in left_out)
    assert sum(len(set(range(len(o))) - set(tr[s]) - set(va[s])) for s, o in origins.items()) > 0
    # the buffer is one patch width whatever the stride (at stride 16 and 8 too, not one stride)
    for stride in (16, 8):
        o = np.array([[r, c] for r in range(0, 256, stride) for c in range(0, 256, stride)])
        tr, va = blocked_split({"A": o}, 0.2, seed=3)
        edge_gap = min(np.abs(o[t] - o[v]).max() - 32 for t in tr["A"] for v in va["A"])
        assert edge_gap == 32  # the nearest kept training patch is exactly one patch width away


def test_test_patient_is_isolated_and_statistics_come_from_training(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold("tiny", "tiny-cnn", "P2", mode="random", workspace=ws, **FAST)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["train_samples"] == ["P1"] and cfg["fold"] == "P2"
    ck = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)
    inputs = FoldInputs(Workspace(ws).dataset("tiny"), Workspace(ws).feature_store("tiny", "tiny-cnn", random=True))
    p1 = inputs.arrays["P1"]
    expect = TargetTransform.fit([load_targets(p1, np.arange(len(p1.origin)))])
    assert np.allclose(ck["transform"]["mean"], expect.mean) and np.allclose(ck["transform"]["std"], expect.std)
    p2 = inputs.arrays["P2"]
    with_test = TargetTransform.fit(
        [load_targets(p1, np.arange(len(p1.origin))), load_targets(p2, np.arange(len(p2.origin)))]
    )
    assert not np.allclose(ck["transform"]["mean"], with_test.mean)
    # every patch the training loop saw came from the training patient
    from train.data import Batches

    tr, va = blocked_split({"P1": p1.origin}, 0.15, 0)
    seen = {
        k
        for b in (Batches(inputs, tr, expect, 4, False), Batches(inputs, va, expect, 4, False))
        for *_, keys in b.epoch(shuffle=True)
        for k in keys
    }
    assert seen and {s for s, _ in seen} == {"P1"}
    # predictions cover exactly the test patient's patches
    pred = xr.open_zarr(res.run_dir / "predictions.zarr")
    assert pred.pred.dims == ("patch", "gene", "row", "col")
    assert np.array_equal(pred.origin.values, p2.origin)
    assert pred.pred.shape == (len(p2.origin), 50, 32, 32)


def test_streamed_batches_hold_each_selected_patch_once_with_its_own_targets(tiny_cnn_features):
    """Streaming (chunk reads, shuffle buffer) and in-memory batches: the same patches, each with its own
    tokens and targets; a selection that cuts through chunks keeps only the selected patches."""
    from train.data import Batches, read_tokens

    ws, _ = tiny_cnn_features
    inputs = FoldInputs(Workspace(ws).dataset("tiny"), Workspace(ws).feature_store("tiny", "tiny-cnn", random=True))
    every = {s: np.arange(len(a.origin)) for s, a in inputs.arrays.items()}
    transform = TargetTransform.fit(load_targets(inputs.arrays[s], every[s]) for s in inputs.samples)
    some = {s: idx[(idx % 3 != 1)] for s, idx in every.items()}  # every third patch left out
    for selection in (every, some):
        expected = {(s, int(i)) for s, idx in selection.items() for i in idx}
        runs = {}
        for in_memory in (False, True):
            batches = list(Batches(inputs, selection, transform, 5, in_memory=in_memory).epoch(shuffle=True, seed=3))
            keys = [k for *_, ks in batches for k in ks]
            assert len(keys) == len(expected) and set(keys) == expected  # each once
            assert all(len(b[3]) == 5 for b in batches[:-1])
            runs[in_memory] = batches
            for tokens, y, mask, ks in batches[:3]:
                for j, (s, i) in enumerate(ks):
                    arr = inputs.arrays[s]
                    assert np.array_equal(tokens[j], read_tokens(arr, s, np.array([i]))[0])
                    counts, library, m = load_targets(arr, np.array([i]))
                    assert np.allclose(y[j], transform(counts, library)[0]) and np.array_equal(mask[j], m[0])
        # the same seed mixes the same way whether blocks come from disk or memory
        assert [b[3] for b in runs[False]] == [b[3] for b in runs[True]]
    ordered = [k for *_, ks in Batches(inputs, some, transform, 5, in_memory=False).epoch(shuffle=False) for k in ks]
    assert ordered == sorted(ordered, key=lambda k: (inputs.samples.index(k[0]), k[1]))


def test_same_seed_same_metrics_and_resume(tiny_cnn_features, tmp_path):
    ws, _ = tiny_cnn_features
    a = run_fold("tiny", "tiny-cnn", "P1", mode="random", workspace=ws, **FAST)
    first = json.loads((a.run_dir / "metrics.json").read_text())
    floor = first["baselines"][
        "per_gene_mean"
    ]  # the training mean's score beside every metric, and the ceiling's error
    assert set(floor) == {"pcc_gene", "pcc_global", "spearman_gene", "spearman_global", "mse", "ssim_st"} | {
        "pcc_gene_patch",
        "pcc_gene_16um",
        "pcc_gene_32um",
    }
    assert floor["pcc_gene"] == 0.0 and abs(floor["ssim_st"]) < 0.2
    assert 0 < first["noise_ceiling"]["pcc_gene_mc_error"] <= 0.002
    shutil.rmtree(a.run_dir)
    b = run_fold("tiny", "tiny-cnn", "P1", mode="random", workspace=ws, **FAST)
    assert json.loads((b.run_dir / "metrics.json").read_text()) == first
    assert run_fold("tiny", "tiny-cnn", "P1", mode="random", workspace=ws, **FAST).reused
    # An interrupted run resumes from its last finished epoch and ends where an uninterrupted one does.
    shutil.rmtree(b.run_dir)
    args = [
        sys.executable,
        "-m",
        "train.cli",
        "decoder",
        "--fold",
        "P1",
        "--encoder",
        "tiny-cnn",
        "--mode",
        "random",
        "--dataset",
        "tiny",
        "--decoder",
        "linear",
        "--val-fraction",
        "0",
        "--epochs",
        "40",
        "--batch-size",
        "4",
        "--lr",
        "0.001",
        "--device",
        "cpu",
        "--workspace",
        str(ws),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = b.run_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b.run_dir / "metrics.json").exists()
    assert subprocess.run(args, capture_output=True).returncode == 0
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert sorted(set(epochs)) == list(range(40))
    resumed = json.loads((b.run_dir / "metrics.json").read_text())
    shutil.rmtree(b.run_dir)
    assert subprocess.run(args, capture_output=True).returncode == 0
    straight = json.loads((b.run_dir / "metrics.json").read_text())
    assert resumed["pcc_gene"] == straight["pcc_gene"] and resumed["mse"] == straight["mse"]


def test_loocv_writes_the_comparison_file(tiny_cnn_features):
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
    assert {"summary", "methodology", "results"} <= set(res)
    run = res["results"]["tiny-cnn_random-linear"]
    assert run["encoder"] == "tiny-cnn" and run["frozen"] is True
    folds = run["fold_results"]
    assert set(folds) == {"test_P1", "test_P2"}
    vals = [folds[f]["pearson_r"] for f in folds]
    assert run["pearson_r"]["mean"] == pytest.approx(np.mean(vals)) and run["pearson_r"]["std"] == pytest.approx(
        np.std(vals)
    )
    for key in ("spearman_rho", "ssim_st", "mse", "pcc_gene"):
        assert set(run[key]) >= {"mean", "std"}
    assert "pcc_gene" in r.output and "encoder_loocv_comparison.json" in r.output


def test_decoder_bad_input(tiny_cnn_features, prepared, tmp_path):
    ws, _ = tiny_cnn_features
    run = lambda *a: CliRunner().invoke(
        app, ["decoder", "--dataset", "tiny", "--workspace", str(ws), "--val-fraction", "0", "--epochs", "1", *a]
    )  # noqa: E731
    r = run("--fold", "P9", "--encoder", "tiny-cnn", "--mode", "random")
    assert r.exit_code == 2 and "not a patient" in r.output and "P1, P2" in r.output
    r = run("--fold", "P1", "--encoder", "tiny-vit", "--mode", "frozen")
    assert r.exit_code == 2 and "featcache extract --dataset tiny --encoder tiny-vit" in r.output
    # an incomplete store
    store = ws / "features" / "tiny" / "tiny-cnn-random.zarr"
    copy = ws / "features" / "tiny" / "tiny-cnn.zarr"
    shutil.copytree(store, copy)
    (copy / "P1" / "_done" / "0").unlink()
    r = run("--fold", "P1", "--encoder", "tiny-cnn", "--mode", "frozen")
    assert r.exit_code == 2 and "incomplete" in r.output
    shutil.rmtree(copy)
    # non-finite features, in a copy of the workspace (a random-init store trains only as --mode random)
    nan_ws = tmp_path / "nan"
    for sub in ("datasets", "features"):
        shutil.copytree(ws / sub, nan_ws / sub)
    g = zarr.open_group(zarr.storage.LocalStore(nan_ws / "features" / "tiny" / "tiny-cnn-random.zarr"), mode="r+")
    t = g["P1"]["tokens"]
    block = t[:1]
    block[0, 0, 0, 0] = np.nan
    t[:1] = block
    r = run("--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", "--workspace", str(nan_ws))
    assert r.exit_code == 2 and "non-finite features" in r.output
    # features of another dataset (fingerprint differs)
    other = tmp_path / "ws2"
    shutil.copytree(ws / "datasets", other / "datasets")
    shutil.copytree(ws / "features", other / "features")
    meta_path = other / "datasets" / "tiny" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "sha256:other"
    meta_path.write_text(json.dumps(meta))
    r = CliRunner().invoke(
        app,
        [
            "decoder",
            "--dataset",
            "tiny",
            "--workspace",
            str(other),
            "--fold",
            "P1",
            "--encoder",
            "tiny-cnn",
            "--mode",
            "random",
            "--val-fraction",
            "0",
            "--epochs",
            "1",
        ],
    )
    assert r.exit_code == 2 and "fingerprint" in r.output


def test_random_densenet_features_beat_mean_and_shuffled_controls(prepared):
    """Frozen features of a fixed random-weight DenseNet-121 carry signal on the synthetic data."""
    from featcache.extract import ExtractionConfig, extract

    ws, _ = prepared
    extract("tiny", ExtractionConfig("densenet121", "random:0"), workspace=ws, show_progress=False, device="cpu")
    common = dict(
        mode="random",
        decoder="unet",
        epochs=30,
        batch_size=2,
        lr=1e-3,
        seed=0,
        device="cpu",
        val_fraction=0.0,
        workspace=ws,
        show_progress=False,
    )
    real = run_fold("tiny", "densenet121", "P2", **common).metrics
    shuffled = run_fold("tiny", "densenet121", "P2", control="shuffled", **common).metrics
    ceiling = real["noise_ceiling"]["pcc_gene"]
    print(
        f"pcc_gene: decoder {real['pcc_gene']:.3f}, shuffled {shuffled['pcc_gene']:.3f}, ceiling {ceiling:.3f}; "
        f"mse: decoder {real['mse']:.3f}, per-gene mean {real['baselines']['per_gene_mean']['mse']:.3f}"
    )
    # The per-gene-mean predictor is constant, so its pcc_gene is 0 by construction; with ~4 training
    # patches the decoder's MSE is not yet below it (the demo-scale run in benchmarks/RESULTS.md is).
    assert real["pcc_gene"] > 0.05
    assert real["pcc_gene"] > shuffled["pcc_gene"] + 0.05
    assert real["pcc_gene"] < ceiling


def test_a_moved_workspace_keeps_its_runs(tiny_cnn_features, tmp_path):
    """Run folders record identities, never absolute paths: a copied workspace reuses them."""
    ws, _ = tiny_cnn_features
    first = run_fold("tiny", "tiny-cnn", "P1", mode="random", workspace=ws, **FAST)
    config = json.loads((first.run_dir / "config.json").read_text())
    assert str(ws) not in json.dumps({k: v for k, v in config.items() if k != "provenance"})
    moved = tmp_path / "elsewhere"
    for sub in ("datasets", "features", "runs"):
        shutil.copytree(ws / sub, moved / sub)
    again = run_fold("tiny", "tiny-cnn", "P1", mode="random", workspace=moved, **{**FAST, "overwrite": False})
    assert again.reused and again.metrics["pcc_gene"] == first.metrics["pcc_gene"]


def test_overlapping_patches_score_each_bin_once(synth_dir, tmp_path):
    """With --stride 16 a bin lies in up to four patches; every metric counts it once, averaged (as stitch does)."""
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset

    ws = tmp_path / "ws"
    prepare_dataset(
        "ovl", {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}, stride=16, workspace=ws, show_progress=False
    )
    extract("ovl", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    res = run_fold("ovl", "tiny-cnn", "P2", mode="random", decoder="linear", epochs=1, batch_size=4, workspace=ws)
    t = Workspace(ws).open_dataset("ovl").targets("P2")
    covered = set()
    for (r0, c0), m in zip(t.origin.values, t.mask.values):
        covered |= {(r0 + i, c0 + j) for i, j in zip(*np.nonzero(m))}
    assert res.metrics["n_patches"] * 32 * 32 > 1.5 * len(covered)  # the patches overlap ...
    assert res.metrics["n_bins"] == len(covered)  # ... and each in-tissue bin is scored once
    # the z-score statistics count each in-tissue bin of the training patient once too (they weighted interior bins
    # by the number of patches holding them: up to four at stride 16)
    p1 = Workspace(ws).open_dataset("ovl").targets("P1")
    unique = {}
    for o, c, lib, m in zip(p1.origin.values, p1.counts.values, p1.library_size.values, p1.mask.values):
        for i, j in zip(*np.nonzero(m)):
            unique[(o[0] + i, o[1] + j)] = (c[:, i, j], lib[i, j])
    counts = np.stack([v[0] for v in unique.values()])
    library = np.array([v[1] for v in unique.values()])
    probe = TargetTransform("log1p-cp10k", 0.0, 1.0)
    values = probe.values(counts[:, :, None, None], library[:, None, None])[..., 0, 0].astype(np.float64)
    ck = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)
    assert np.allclose(ck["transform"]["mean"], values.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.allclose(ck["transform"]["std"], values.std(axis=0), rtol=1e-5, atol=1e-6)
    arrays = FoldInputs(Workspace(ws).dataset("ovl"), None).arrays["P1"]
    per_patch = TargetTransform.fit([load_targets(arrays, np.arange(len(arrays.origin)))])
    assert not np.allclose(ck["transform"]["mean"], per_patch.mean, atol=1e-4)  # what counting per patch gave
