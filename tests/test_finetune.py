"""Fine-tune and random-init modes: augmentation alignment, encoder updates, LOOCV merge, resume, DDP."""

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
from conftest import run_fold
from typer.testing import CliRunner

from featcache.encoders import get_spec
from featcache.weights import load_encoder, resolve_weights
from pipeline.cli import train_app as app
from train.finetune import colour_jitter, dihedral

FT = dict(
    mode="finetune",
    weights="random:0",
    decoder="linear",
    epochs=2,
    batch_size=4,
    micro_batch=2,
    lr=1e-3,
    encoder_lr=1e-3,
    seed=0,
    device="cpu",
    show_progress=False,
)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_rotated_image_still_lines_up_with_rotated_targets(k, flip):
    """Block (i, j) of the image carries bin (i, j)'s target value; after any dihedral transform too."""
    rng = np.random.default_rng(k)
    values = rng.integers(0, 256, (2, 32, 32))
    image = torch.from_numpy(
        np.repeat(np.repeat(values, 14, axis=1), 14, axis=2)[..., None].repeat(3, -1).astype(np.uint8)
    )
    targets = torch.from_numpy(values[:, None].astype(np.float32)).repeat(1, 3, 1, 1)  # (B, G, 32, 32)
    mask = torch.from_numpy(values > 128)
    im, tg, mk = dihedral(image, targets, mask, k, flip)
    blocks = im[..., 0].float().reshape(2, 32, 14, 32, 14)
    assert torch.all(blocks.amin(dim=(2, 4)) == blocks.amax(dim=(2, 4)))  # each 14×14 block is still one bin
    assert torch.equal(blocks[:, :, 0, :, 0], tg[:, 0]) and torch.equal(tg[:, 0] > 128, mk)
    if k or flip:
        assert not torch.equal(tg, targets)


def test_colour_jitter_is_light_and_seeded():
    x = torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)
    a = colour_jitter(x, 0.05, torch.Generator().manual_seed(1))
    b = colour_jitter(x, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert (a.float() - 128).abs().max() <= 0.05 * 128 + 0.05 * 255 + 1


def test_finetune_changes_encoder_weights_frozen_does_not(tiny_cnn_features):
    ws, feats = tiny_cnn_features
    res = run_fold("tiny", "tiny-cnn", "P2", workspace=ws, **FT)
    state = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)["state_dict"]
    spec = get_spec("tiny-cnn")
    original, _ = load_encoder(spec, resolve_weights(spec, "random:0"))
    changed = [
        k
        for k, v in original.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, state[f"encoder.model.{k}"])
    ]
    assert len(changed) > 10
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["mode"] == "finetune" and cfg["encoder_weights"] == "random:0"
    assert cfg["augment"] is None and cfg["run"] == "finetune-randomweights-linear"  # no augmentation by default
    assert cfg["features"]["identity"]["source"] == "patches.zarr"  # no cache used
    # A frozen run trains the decoder only: its checkpoint holds no encoder, the cache is untouched.
    store = ws / "features" / "tiny" / "tiny-cnn-random.zarr"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    frozen = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="random",
        decoder="linear",
        epochs=2,
        batch_size=4,
        seed=0,
        device="cpu",
        workspace=ws,
        show_progress=False,
        overwrite=True,
    )
    fstate = torch.load(frozen.run_dir / "checkpoint.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("encoder") for k in fstate)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_loocv_three_modes_one_file_and_random_extracted_when_missing(prepared, tmp_path):
    ws, _ = prepared
    shutil.copytree(ws / "datasets", tmp_path / "datasets")
    r = CliRunner().invoke(
        app,
        [
            "loocv",
            "--encoders",
            "tiny-cnn",
            "--modes",
            "random,finetune",
            "--dataset",
            "tiny",
            "--decoder",
            "linear",
            "--val-fraction",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--weights",
            "random:3",
            "--device",
            "cpu",
            "--workspace",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "features" / "tiny" / "tiny-cnn-random.zarr" / "zarr.json").is_file()
    res = json.loads((tmp_path / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    assert {"tiny-cnn_random-linear", "tiny-cnn_finetune-randomweights-linear"} <= set(res["results"])
    assert res["results"]["tiny-cnn_finetune-randomweights-linear"]["frozen"] is False
    assert res["results"]["tiny-cnn_random-linear"]["frozen"] is True
    assert res["results"]["tiny-cnn_random-linear"]["encoder_weights"] == "random:0"
    assert set(res["results"]["tiny-cnn_finetune-randomweights-linear"]["fold_results"]) == {"test_P1", "test_P2"}


def test_finetune_resumes_to_the_same_result(prepared, tmp_path):
    ws, _ = prepared
    shutil.copytree(ws / "datasets", tmp_path / "datasets")
    args = [
        sys.executable,
        "-m",
        "train.cli",
        "finetune",
        "--encoder",
        "tiny-cnn",
        "--weights",
        "random:0",
        "--fold",
        "P1",
        "--dataset",
        "tiny",
        "--decoder",
        "linear",
        "--val-fraction",
        "0",
        "--epochs",
        "12",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--augment",  # resuming restores the augmentation's draws too
        "--device",
        "cpu",
        "--workspace",
        str(tmp_path),
    ]
    run_dir = tmp_path / "runs" / "tiny" / "tiny-cnn" / "finetune-randomweights-linear-augment" / "fold-P1"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    assert subprocess.run(args, capture_output=True).returncode == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(run_dir)
    assert subprocess.run(args, capture_output=True).returncode == 0
    straight = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["pcc_gene"] == straight["pcc_gene"] and resumed["mse"] == straight["mse"]


def test_finetune_under_torchrun_ddp(prepared, tmp_path):
    ws, _ = prepared
    shutil.copytree(ws / "datasets", tmp_path / "datasets")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "train.cli",
            "finetune",
            "--encoder",
            "tiny-cnn",
            "--weights",
            "random:0",
            "--fold",
            "P2",
            "--dataset",
            "tiny",
            "--decoder",
            "linear",
            "--val-fraction",
            "0",
            "--epochs",
            "2",
            "--batch-size",
            "1",
            "--micro-batch",
            "1",
            "--device",
            "cpu",
            "--workspace",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny" / "tiny-cnn" / "finetune-randomweights-linear" / "fold-P2"
    assert json.loads((run_dir / "config.json").read_text())["provenance"]["world_size"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["mode"] == "finetune"
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 2  # one writer: the main rank
