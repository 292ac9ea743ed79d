"""train/model.py: a finished run folder becomes its model again, and that model makes the run's own predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import run_fold

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from train.data import FoldInputs, load_targets, read_tokens
from train.model import EncoderDecoder, load_run


def _inputs(ws, cached: bool) -> dict:
    """The samples' model inputs: the random-weight feature cache's grids, or the dataset's uint8 image patches."""
    w = Workspace.resolve(ws)
    store = w.feature_store("tiny", "tiny-cnn", random=True) if cached else None
    return FoldInputs(w.open_dataset("tiny"), store).arrays


def _apply(model, arrays, sample: str) -> np.ndarray:
    idx = np.arange(len(arrays[sample].origin))
    x = torch.from_numpy(read_tokens(arrays[sample], sample, idx))
    with torch.inference_mode():
        return model(x if x.dtype == torch.uint8 else x.float()).numpy()


def test_a_random_run_reloads_and_reproduces_its_test_predictions(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold("tiny", "tiny-cnn", "P2", mode="random", epochs=2, batch_size=2, lr=1e-3, name="model", workspace=ws)
    stored = xr.open_zarr(res.run_dir / "predictions.zarr")
    assert set(stored.sample.values) == {"P2"}
    trained = load_run(res.run_dir)  # random:0 rebuilds itself: no weights to pass
    assert isinstance(trained.model, EncoderDecoder) and trained.model.cached and not trained.model.training
    assert trained.genes == list(stored.gene.values) and trained.weights == "random:0"
    assert trained.gene_ids == list(stored.gene_id.values)
    pred = stored.pred.values
    # the decoder on the cached grids is what training scored
    assert np.allclose(_apply(trained.model.decoder, _inputs(ws, cached=True), "P2"), pred, rtol=1e-5, atol=1e-6)
    # the whole model on the image patches sees the same float16-rounded grids
    images = _inputs(ws, cached=False)
    assert np.array_equal(images["P2"].origin, stored.origin.values)
    assert np.allclose(_apply(trained.model, images, "P2"), pred, rtol=1e-4, atol=1e-4)
    # the transform maps the z-scored truth back to log1p(CP10k) of the counts
    counts, library, _ = load_targets(images["P2"], np.arange(len(pred)))
    truth = stored.truth.values
    assert np.allclose(trained.expression(truth), trained.transform.values(counts, library), atol=1e-4)


def test_a_finetune_run_reloads_with_its_own_encoder(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    res = run_fold(
        "tiny",
        "tiny-cnn",
        "P2",
        mode="finetune",
        weights="random:0",
        decoder="linear",
        target="log1p-counts",
        epochs=2,
        batch_size=4,
        micro_batch=2,
        lr=1e-3,
        encoder_lr=1e-3,
        name="model",
        workspace=ws,
    )
    trained = load_run(res.run_dir)
    assert not trained.model.cached and trained.weights.startswith("fine-tuned in fold-P2 from random:0")
    pred = xr.open_zarr(res.run_dir / "predictions.zarr").pred.values
    assert np.allclose(_apply(trained.model, _inputs(ws, cached=False), "P2"), pred, rtol=1e-5, atol=1e-6)
    assert trained.expression(pred) is pred  # log1p(counts) is expression already


def test_an_unfinished_run_folder_is_refused(tmp_path):
    with pytest.raises(FeatcacheError, match="not a finished run folder"):
        load_run(tmp_path)
