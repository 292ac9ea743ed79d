"""A trained model, in one place: built from a run's settings for training, rebuilt from a finished run folder.

A frozen or random run trains the decoder (docs/design.md §5) alone on cached token grids; a fine-tune run
trains :class:`EncoderDecoder`, encoder and decoder together, on uint8 image patches. :func:`load_run` turns
either kind of finished run back into an :class:`EncoderDecoder` that takes image patches: the settings come
from ``config.json``, the weights from ``checkpoint.pt``, and a frozen run's encoder weights must have the
identity its feature cache recorded (docs/design.md §7). A run trained on an intermediate layer (``--layer``)
gets an encoder whose grid is that layer's, computed by a forward that stops after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.encoders import GridEncoder
from featcache.errors import FeatcacheError
from featcache.stores import RunDir, check_name
from train.data import TargetTransform
from train.decoder import build_decoder


class EncoderDecoder(nn.Module):
    """uint8 (B, H, W, 3) patches → encoder token grid → decoder → (B, genes, 32, 32).

    ``cached=True`` rounds the grid to float16 before the decoder: a decoder trained on the feature cache
    has only seen float16-stored grids (docs/design.md §7), and is fed the same numbers here.
    """

    def __init__(self, encoder: GridEncoder, decoder: nn.Module, cached: bool = False):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.cached = cached
        self.to_target = None  # a reloaded count-loss run: its log-rates into target space (train/losses.py)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(images)
        grid = tokens.permute(0, 3, 1, 2)
        out = self.decoder((grid.half() if self.cached else grid).float())
        return out if self.to_target is None else self.to_target(out)


def assemble(
    decoder: str,
    c_in: int,
    n_genes: int,
    encoder: GridEncoder | None = None,
    cached: bool = False,
    loss: str = "mse",
):
    """The decoder alone (token grids in), or encoder + decoder (uint8 patches in) when an encoder is given; with a
    count loss the decoder sits in a :class:`~train.losses.CountHead` (its output a log-rate per 10k UMIs)."""
    net = build_decoder(decoder, c_in, n_genes)
    if loss != "mse":
        from train.losses import CountHead

        net = CountHead(net, n_genes, nb=loss == "nb")
    return net if encoder is None else EncoderDecoder(encoder, net, cached)


@dataclass
class TrainedRun:
    """A finished run, ready to predict: model (uint8 NHWC patches → target space), panel, transform.

    A count-loss run's model maps its log-rates into target space itself, with ``exposure`` (docs/design.md §6):
    10k UMIs for log1p(CP10k) (exact: no library size enters), the training median library for log1p(counts)."""

    run: RunDir
    config: dict
    model: EncoderDecoder
    genes: list[str]
    gene_ids: list[str]
    transform: TargetTransform
    weights: str  # the encoder weights' identity
    loss: str = "mse"
    exposure: dict | None = None  # count losses: the library size predictions assume, and why

    @property
    def px_per_bin(self) -> int:
        """Pixels per bin of the patches the run's encoder reads (14, or 16 for a patch-16 encoder)."""
        return self.model.encoder.spec.px_per_bin

    @property
    def label(self) -> str:
        c = self.config
        return check_name(f"{c['dataset']}-{c['encoder']}-{c['run']}-fold-{c['fold']}", "run")

    def expression(self, z: np.ndarray) -> np.ndarray:
        """Model output (patch, gene, row, col) as log1p expression: a z-scored target (log1p(CP10k)) is scaled
        back with the training patients' statistics; log1p(counts) is one already."""
        t = self.transform
        return z * t.std[None, :, None, None] + t.mean[None, :, None, None] if t.zscored else z


def load_run(run_dir: str | Path, weights: str | None = None, dev: torch.device | str = "cpu") -> TrainedRun:
    """The run's model with its encoder weights, refusing weights of another identity than the run's record.

    ``weights`` is the frozen run's encoder checkpoint (as ``--weights``); a random or fine-tune run needs none.
    """
    from featcache.encoders import build_model, get_spec

    run = RunDir(Path(run_dir))
    if run.read_config() is None or not run.is_finished():
        raise FeatcacheError(
            f"{run.path} is not a finished run folder (config.json, checkpoint.pt and metrics.json); "
            "train it first with `train decoder` or `train loocv`."
        )
    if run.read_config().get("decoder") == "ridge":
        raise FeatcacheError(
            f"{run.path} is a ridge run (HEST-Benchmark's head on pooled embeddings): it has no decoder checkpoint to "
            "apply to slides; its fitted PCA and ridge are plain arrays in ridge.npz (train.ridge.load_params). "
            "Predict slides with a unet or linear run."
        )
    run.read_metrics()  # config.json, metrics.json and checkpoint.pt of one run, or refused
    config, ck = run.verified_config(), run.load_checkpoint()
    spec = get_spec(config["encoder"])
    loss = config.get("loss_kind", "mse")
    shape = (config["decoder"], int(ck["c_in"]), len(ck["genes"]))
    if config["mode"] == "finetune":  # the run's own encoder, from its checkpoint
        model = assemble(*shape, GridEncoder(spec, build_model(spec)), loss=loss)
        model.load_state_dict(ck["state_dict"])
        identity = f"fine-tuned in {run.path.name} from {config.get('encoder_weights')}"
    else:
        net, identity = _recorded_encoder(spec, config["features"]["identity"]["weights"], weights)
        grid = GridEncoder(spec, net, layer=config.get("layer"))  # the grid the run was trained on
        model = assemble(*shape, grid, cached=True, loss=loss)
        model.decoder.load_state_dict(ck["state_dict"])
    transform = TargetTransform.from_json(ck["transform"])
    exposure = None
    if loss != "mse":
        from train.losses import TargetSpace, predict_exposure

        exposure = predict_exposure(transform.kind, ck["counts"]["median_library"])
        model.to_target = TargetSpace(transform, exposure["library_size"])
    ids = config.get("gene_ids") or list(ck["genes"])
    return TrainedRun(
        run, config, model.to(dev).eval(), list(ck["genes"]), list(ids), transform, identity, loss, exposure
    )


def _recorded_encoder(spec, recorded: str, weights: str | None) -> tuple[nn.Module, str]:
    """(network, identity) of the encoder weights a frozen run's features came from: ``random:<seed>`` rebuilds
    itself; other weights are found as ``--weights`` finds them and must hash to the recorded identity."""
    from featcache.weights import load_encoder, resolve_weights

    source = resolve_weights(spec, recorded if recorded.startswith("random:") else weights)
    found = source.identity()
    if found != recorded:
        raise FeatcacheError(
            f"the weights found ({source.path or found}, {found[:20]}…) are not the ones the "
            f"run was trained on ({recorded[:20]}…); pass that checkpoint with --weights."
        )
    net, _ = load_encoder(spec, source)
    return net, recorded
