"""A training run's settings: one frozen :class:`TrainConfig`, the single source of every default.

The CLIs (`train decoder`, `train finetune`, `train loocv`) and the Python API all build a
TrainConfig, so an option means the same thing, with the same default, wherever it is reached
from. Its :meth:`TrainConfig.record` is what ``config.json`` holds: the settings plus the identity
of the inputs (dataset fingerprint, feature store or encoder weights), hashed; a run folder is
resumed only by a config with the same hash.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from featcache.errors import FeatcacheError
from featcache.stores import check_name
from featcache.stores.runs import config_digest

MODES = ("frozen", "random", "finetune")
DECODERS = ("unet", "linear", "ridge")  # ridge: HEST-Benchmark's patch-level head (train/ridge.py)
CONTROLS = ("shuffled",)
TARGETS = ("log1p-cp10k", "log1p-counts")  # ours (z-scored per gene) | the reference pipeline's
LOSSES = ("mse", "poisson", "nb")  # train/losses.py: MSE in target space | count likelihoods of the raw counts
SCORES = ("in-tissue", "all-bins")  # ours | the reference pipeline's (every bin of the patch)
BLOCK_BINS = 64  # validation blocks: 64 × 64 bins of the training patients
TRANSFORM_TEXT = {
    "log1p-cp10k": "log1p(counts per 10k of the bin's Gene Expression UMIs), z-scored per gene with statistics of "
    "the training patients' in-tissue bins",
    "log1p-counts": "log1p(raw counts), not normalised or scaled (the reference pipeline's targets)",
}
SCORE_TEXT = {
    "in-tissue": "in-tissue bins only (loss, selection and metrics)",
    "all-bins": "every bin of each patch, in tissue or not (the reference pipeline's scoring)",
}
RIDGE_UNUSED = ("epochs", "batch_size", "lr", "lr_grid", "control")  # options the ridge head has no use for
LOSS_TEXT = {
    "mse": "MSE over in-tissue bins",  # the text runs have always recorded (their config hash is unchanged)
    "poisson": "Poisson NLL of the raw counts over the scored bins; the decoder outputs a log-rate per 10k UMIs "
    "(plus a fixed per-gene offset; output layer initialised at zero), expected count = exp(output) × the bin's "
    "library size / 1e4",
    "nb": "negative binomial NLL of the raw counts over the scored bins, a learned per-gene size θ (log θ a model "
    "parameter, initialised at 0, Var = μ + μ²/θ); the decoder outputs a log-rate per 10k UMIs (plus a fixed "
    "per-gene offset; output layer initialised at zero), expected count μ = exp(output) × the bin's library size / 1e4",
}
MAPPING_TEXT = {
    "log1p-cp10k": "predicted mean count / library × 1e4 = exp(output), log1p, z-scored with the training statistics "
    "(no library size needed)",
    "log1p-counts": "log1p(predicted mean count) = log1p(exp(output) × L / 1e4), L the training patients' median "
    "in-tissue library size for every bin (in scoring and in featcache predict)",
}
FINETUNE_ONLY = ("weights", "encoder_lr", "micro_batch", "grad_checkpointing", "augment", "colour_jitter")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one fold's result (runtime choices such as the device are not here)."""

    dataset: str
    encoder: str
    fold: str
    mode: str = "frozen"  # frozen | random | finetune
    decoder: str = "unet"  # unet (Img2ST-Net MiniUNet) | linear
    control: str | None = None  # "shuffled": targets shuffled across training patches
    epochs: int = 200
    batch_size: int = 64  # effective batch (patches per optimizer step)
    lr: float = 1e-4  # decoder learning rate (Adam, no weight decay)
    seed: int = 0
    val_fraction: float = 0.15
    target: str = "log1p-cp10k"  # log1p(CP10k) z-scored per gene | log1p-counts (the reference pipeline)
    score: str = "in-tissue"  # bins in loss and metrics: in-tissue | all-bins (the reference pipeline)
    loss: str = "mse"  # mse (target space) | poisson | nb (raw counts, the bin's library size as exposure)
    dispersion_lr: float = 1e-2  # nb only: Adam learning rate of the per-gene log dispersion
    name: str | None = None  # a variant's name: runs/<dataset>/<encoder>/<run>-<name>/ beside the default run
    lr_grid: tuple[float, ...] | None = None  # an lr-grid trial: lr is one of these, chosen per fold on validation
    layer: int | None = None  # cached runs: train on the store's tokens_<layer> (extract --layers), not the final grid
    alpha: str | None = None  # ridge only: "cv" (inner leave-one-patient-out over ALPHA_GRID, the default), "hest"
    # (HEST-Benchmark's fixed 100 / (components × genes)) or a positive number
    # fine-tune mode only
    weights: str | None = None  # file, folder or random[:SEED]; recorded by identity, never by path
    encoder_lr: float = 1e-5
    micro_batch: int = 16  # patches per forward pass; gradients accumulate to batch_size
    grad_checkpointing: bool = False
    augment: bool = False  # dihedral augmentation (fine-tuning only; a named variant, "-augment")
    colour_jitter: float = 0.0

    @property
    def weights_spec(self) -> str | None:
        """The weights a fine-tune starts from: bare ``random`` draws its encoder per seed (random:<seed>), as
        random-init feature stores are; an explicit random:K stays what was asked."""
        return f"random:{self.seed}" if self.weights == "random" else self.weights

    @classmethod
    def from_options(cls, **options) -> TrainConfig:
        """A config from keyword options, ignoring those left as None (their default applies)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def but(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    @property
    def finetune(self) -> bool:
        return self.mode == "finetune"

    @property
    def run_name(self) -> str:
        """The run folder's name: the mode, then what differs from the default protocol (fine-tuning from random
        weights, an intermediate layer, decoder, loss, control, target, scoring, augmentation), then the variant name
        (docs/design.md §7)."""
        parts = [
            self.mode,
            f"layer{self.layer}" if self.layer is not None else None,
            "randomweights" if self.finetune and str(self.weights).startswith("random") else None,
            self.decoder if self.decoder != "unet" else None,
            self.alpha_tag,
            self.loss if self.loss != "mse" else None,
            self.control,
            "counts" if self.target == "log1p-counts" else None,
            "allbins" if self.score == "all-bins" else None,
            "augment" if self.augmented else None,
            "lrgrid" if self.lr_grid else None,
            self.name,
        ]
        return "-".join(p for p in parts if p)

    @property
    def ridge(self) -> bool:
        return self.decoder == "ridge"

    @property
    def ridge_alpha(self) -> str:
        """The ridge head's α rule: "cv", "hest" or a number (as text)."""
        return "cv" if self.alpha is None else str(self.alpha)

    @property
    def alpha_tag(self) -> str | None:
        """The run name's α part: none for the default (cv), ``hestalpha`` for HEST's, ``alpha<value>`` for a number."""
        if not self.ridge or self.ridge_alpha == "cv":
            return None
        return "hestalpha" if self.ridge_alpha == "hest" else f"alpha{float(self.ridge_alpha):g}"

    @property
    def trial_lr(self) -> float | None:
        """The learning rate that names this run's folder: an lr-grid trial's lr, else None."""
        return self.lr if self.lr_grid else None

    @property
    def default_protocol(self) -> bool:
        """The comparison's own protocol (the reference study's run keys are given to these runs only)."""
        return self.run_name == self.mode

    @property
    def micro(self) -> int:
        return min(self.micro_batch, self.batch_size) if self.finetune else self.batch_size

    @property
    def augmented(self) -> bool:
        return bool(self.augment)

    def validate(self) -> TrainConfig:
        for what, name in (("dataset", self.dataset), ("encoder", self.encoder), ("fold", self.fold)):
            check_name(name, what)
        if self.name is not None:
            check_name(self.name, "--name")
        if self.target not in TARGETS:
            raise FeatcacheError(f"--target {self.target!r}: use {' or '.join(TARGETS)}.")
        if self.score not in SCORES:
            raise FeatcacheError(f"--score {self.score!r}: use {' or '.join(SCORES)}.")
        if self.loss not in LOSSES:
            raise FeatcacheError(f"--loss {self.loss!r}: use {', '.join(LOSSES)}.")
        if self.loss == "nb" and not (math.isfinite(self.dispersion_lr) and self.dispersion_lr > 0):
            raise FeatcacheError(f"dispersion_lr {self.dispersion_lr}: must be a positive number.")
        if self.mode not in MODES:
            raise FeatcacheError(f"--mode {self.mode!r}: use {', '.join(MODES)}.")
        if self.decoder not in DECODERS:
            raise FeatcacheError(f"--decoder {self.decoder!r}: use one of {', '.join(DECODERS)}.")
        if self.control not in (None, *CONTROLS):
            raise FeatcacheError(f"--control {self.control!r}: the only control is 'shuffled'.")
        if self.epochs < 1 or self.batch_size < 1:
            raise FeatcacheError(f"--epochs {self.epochs} and --batch-size {self.batch_size}: both must be at least 1.")
        for name in ("lr", "encoder_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise FeatcacheError(f"--{name.replace('_', '-')} {v}: must be a positive number.")
        if not (math.isfinite(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise FeatcacheError(f"--val-fraction {self.val_fraction}: must be at least 0 and below 1.")
        if self.lr_grid is not None:
            grid = self.lr_grid
            if not grid or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in grid):
                raise FeatcacheError(
                    f"--lr-grid {','.join(map(str, grid))}: give positive learning rates, e.g. 1e-4,3e-4."
                )
            if self.lr not in grid:
                raise FeatcacheError(f"lr {self.lr} is not one of --lr-grid {','.join(map(str, grid))}.")
            if self.val_fraction == 0:
                raise FeatcacheError(
                    "--lr-grid chooses the learning rate on the validation region: --val-fraction > 0."
                )
        if self.seed < 0:
            raise FeatcacheError(f"--seed {self.seed}: must be 0 or more.")
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
                raise FeatcacheError(f"--layer {self.layer}: a block number counted from 1 (as extract --layers).")
            if self.finetune:
                raise FeatcacheError(
                    "--layer trains on an intermediate layer of a feature store (frozen or random mode); fine-tuning "
                    "trains the whole encoder on its final grid."
                )
        self._validate_ridge()
        if not (math.isfinite(self.colour_jitter) and 0 <= self.colour_jitter < 1):
            raise FeatcacheError(f"--colour-jitter {self.colour_jitter}: must be at least 0 and below 1.")
        if self.augment and not self.finetune:
            raise FeatcacheError(
                "augmentation applies to image patches: use it with fine-tuning (cached grids are fixed)."
            )
        if self.finetune and (self.micro_batch < 1 or self.batch_size % self.micro):
            raise FeatcacheError(
                f"--micro-batch {self.micro_batch} must divide --batch-size {self.batch_size} (gradient accumulation)."
            )
        return self

    def _validate_ridge(self) -> None:
        """--alpha belongs to the ridge head; the ridge head has no epochs, batches, learning rate or validation
        region (α comes from inner folds), so those options are refused unless left at their defaults."""
        if not self.ridge:
            if self.alpha is not None:
                raise FeatcacheError(f"--alpha {self.alpha}: only the ridge head has an α; add --decoder ridge.")
            return
        a = self.ridge_alpha
        if a not in ("cv", "hest"):
            try:
                ok = math.isfinite(float(a)) and float(a) > 0
            except ValueError:
                ok = False
            if not ok:
                raise FeatcacheError(
                    f"--alpha {a!r}: use cv (inner folds), hest (HEST-Benchmark's) or a positive number."
                )
        if self.mode == "finetune":
            raise FeatcacheError(
                "--decoder ridge fits on a feature store's cached pooled embeddings, not end to end: run it with "
                "`train decoder --decoder ridge` (mode frozen or random)."
            )
        defaults = {f.name: f.default for f in fields(self)}
        if self.loss != "mse":
            raise FeatcacheError(
                f"--loss {self.loss}: the ridge head is a least-squares fit to the patch-mean target (HEST-Benchmark's "
                "protocol); count losses apply to the unet and linear decoders."
            )
        if self.layer is not None:
            raise FeatcacheError(
                f"--layer {self.layer}: the ridge head reads the store's pooled embeddings, which come from the final "
                "layer; train a unet or linear decoder on an intermediate layer."
            )
        unused = [n for n in RIDGE_UNUSED if getattr(self, n) != defaults[n]]
        if self.val_fraction not in (defaults["val_fraction"], 0):
            unused.append("val_fraction")
        if self.control is not None:
            raise FeatcacheError(
                f"--control {self.control}: the ridge head has no shuffled control; run the control with a unet or "
                "linear decoder."
            )
        unused = [n for n in unused if n != "control"]
        if unused:
            names = ", ".join("--" + n.replace("_", "-") for n in unused)
            raise FeatcacheError(
                f"{names}: no effect with --decoder ridge (PCA + ridge regression in closed form, α chosen by inner "
                "folds over the training patients); leave them out."
            )

    def record(self, inputs: dict) -> dict:
        """config.json: the settings, descriptions of the fixed choices, the inputs' identity, its sha256."""
        settings = {k: v for k, v in asdict(self).items() if self.finetune or k not in FINETUNE_ONLY}
        settings.pop("weights", None)  # a path; the weights' identity is in ``inputs``
        if self.layer is None:
            settings.pop("layer")  # runs on the final grid keep the config (and hash) they always had
        settings.pop("loss")  # MSE runs keep the config (and hash) they always had; count losses: below
        if self.loss != "nb":
            settings.pop("dispersion_lr")
        if self.lr_grid is None:
            settings.pop("lr_grid")  # likewise runs without a grid
        else:
            settings["lr_grid"] = sorted(self.lr_grid)
        settings.pop("alpha")  # the ridge head records its own settings below; other runs keep their hash
        if self.ridge:
            from train.ridge import ridge_record

            for name in (*RIDGE_UNUSED, "val_fraction"):
                settings.pop(name, None)
            record = {**settings, "run": self.run_name, **ridge_record(self), **inputs}
            record["config_sha256"] = config_digest(record)
            return record
        if self.finetune:
            settings.update(
                {
                    "micro_batch": self.micro,
                    "augment": "dihedral (8)" if self.augmented else None,
                    "precision": "bf16 autocast on GPU, fp32 on CPU",
                }
            )
        record = {
            **settings,
            "run": self.run_name,
            "optimizer": "Adam",
            "weight_decay": 0.0,
            "loss": LOSS_TEXT[self.loss],
            "val_split": f"one compact region of {BLOCK_BINS}×{BLOCK_BINS}-bin blocks per training section "
            "(val_fraction of its patches); training patches overlapping or adjoining it are left out",
            "selection": "epoch with the best validation pcc_gene (the last epoch when val_fraction is 0)",
            "target_transform": TRANSFORM_TEXT[self.target],
            "scored_bins": SCORE_TEXT[self.score],
            **inputs,
        }
        if self.loss != "mse":
            record.update({"loss_kind": self.loss, "to_target_space": MAPPING_TEXT[self.target]})
        record["config_sha256"] = config_digest(record)
        return record
