"""Shared fixtures: one small synthetic Visium HD dataset per test session (real files on disk)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# No test may reach the network: weights are never downloaded here (tests/test_hub.py runs its own local hub).
os.environ["HF_HUB_OFFLINE"] = "1"

from featcache.synth import SynthConfig, synthesize  # noqa: E402

# Small enough for 2 CPU cores, large enough for several patches per sample.
SMALL = SynthConfig(rows=72, cols=104, n_genes=120, seed=3)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Two samples; P2's grid is rotated and flipped (array_row runs against pxl_row)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, ["P1"], SMALL)
    synthesize(out, ["P2"], SynthConfig(**{**SMALL.__dict__, "rotation_deg": -1.3, "flip_rows": True}))
    return out


@pytest.fixture(scope="session")
def prepared(synth_dir, tmp_path_factory):
    """The two samples prepared as dataset 'tiny' in a session workspace."""
    from featcache.prepare import prepare_dataset

    ws = tmp_path_factory.mktemp("ws")
    res = prepare_dataset(
        "tiny", {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}, workspace=ws, show_progress=False
    )
    return ws, res


@pytest.fixture(scope="session")
def prepared16(synth_dir, tmp_path_factory):
    """The same two samples as dataset 'tiny16', rendered at 14 and 16 px per bin (``image`` and ``image_16px``)."""
    from featcache.prepare import prepare_dataset

    ws = tmp_path_factory.mktemp("ws16")
    samples = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}
    res = prepare_dataset("tiny16", samples, workspace=ws, show_progress=False, px_per_bin="14,16")
    return ws, res


def clone_sample(src: Path, dst: Path) -> Path:
    """Copy a sample's small files and link its big ones, so a test can damage the copy."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix in (".btf",):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dst


BIN8 = Path("outs") / "binned_outputs" / "square_008um"


@pytest.fixture(scope="session")
def tiny_cnn_features(prepared):
    """Random-weight tiny-cnn features of the 'tiny' dataset (14×14 grid, 96 channels)."""
    from featcache.extract import ExtractionConfig, extract

    ws, _ = prepared
    res = extract("tiny", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    return ws, res


def run_fold(
    dataset,
    encoder,
    fold,
    *,
    workspace,
    device="cpu",
    show_progress=False,
    overwrite=False,
    in_memory="auto",
    **settings,
):
    """train_fold with the settings as keywords (a TrainConfig) and the runtime choices beside them."""
    from train.config import TrainConfig
    from train.run import train_fold

    settings.setdefault("val_fraction", 0.0)  # 5 patches per sample: too few for a validation region and its buffer
    cfg = TrainConfig(dataset=dataset, encoder=encoder, fold=fold, **settings)
    return train_fold(
        cfg, workspace, device=device, in_memory=in_memory, overwrite=overwrite, show_progress=show_progress
    )


def dense_counts(path):
    """(MatrixH5, counts as a dense bins × features array) of a small matrix file."""
    import numpy as np

    from featcache.visium import MatrixH5

    m = MatrixH5(path)
    return m, m.gather(np.arange(m.n_features))
