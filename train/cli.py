"""The ``train`` command line (stage 2): the shared decoder on cached token grids, LOOCV, summaries.

Every training setting's default comes from :class:`train.config.TrainConfig`, so `train decoder`,
`train finetune` and `train loocv` agree on them; the options every command line shares (dataset,
device, overwrite, workspace) come from featcache/cli_common.py.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from featcache.cli_common import (
    DatasetOpt,
    DeviceOpt,
    FeaturesRootOpt,
    OverwriteOpt,
    WorkspaceOpt,
    make_app,
    out,
    user_errors,
)
from train.config import TrainConfig

app = make_app("train: fit the shared Img2ST-Net decoder on cached token grids, leave-one-patient-out.")
D = TrainConfig.__dataclass_fields__  # the one place defaults come from


def _default(name: str):
    return D[name].default


Fold = Annotated[str, typer.Option(help="The test patient (its sections are tested on, never trained on).")]
Epochs = Annotated[int, typer.Option(help="Training epochs (the reference study used 200).")]
Batch = Annotated[int, typer.Option(help="Effective batch: patches per optimizer step.")]
Lr = Annotated[float, typer.Option(help="Decoder learning rate (Adam, no weight decay).")]
Seed = Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling (recorded).")]
Seeds = Annotated[
    Optional[str],
    typer.Option(help="Comma-separated seeds, e.g. 0,1,2: each seed its own run folder (instead of --seed)."),
]


def seed_list(seed: int, seeds: str | None) -> list[int]:
    """``--seed S`` (one seed) or ``--seeds 0,1,2``; both at once is refused."""
    from featcache.errors import FeatcacheError

    if seeds is None:
        return [seed]
    if seed != _default("seed"):
        raise FeatcacheError(f"--seed {seed} and --seeds {seeds}: give one of them.")
    parts = [p.strip() for p in seeds.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise FeatcacheError(
            f"--seeds {seeds!r}: write distinct non-negative integers separated by commas, e.g. 0,1,2."
        )
    return [int(p) for p in parts]


ValFrac = Annotated[
    float,
    typer.Option(
        help="Share of each training section held out as a validation region for epoch "
        "selection (0: none, the last epoch is kept)."
    ),
]
InMemory = Annotated[str, typer.Option(help="auto (load the training set when it fits 40 % of RAM), yes, no.")]
DecoderOpt = Annotated[
    str,
    typer.Option(
        "--decoder",
        help="unet (Img2ST-Net MiniUNet), linear (per-token 1×1 baseline) or ridge (HEST-Benchmark's head: "
        "pooled embedding → PCA → ridge, fitted in closed form; no epochs).",
    ),
]
AlphaOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Ridge head only: cv (inner leave-one-patient-out over a grid, the default), hest (HEST-Benchmark's "
        "fixed 100 / (components × genes)) or a number."
    ),
]
Weights = Annotated[
    Optional[str], typer.Option(help="Pretrained weights of fine-tune runs (file, folder), or random[:SEED].")
]
EncoderLr = Annotated[float, typer.Option(help="Encoder learning rate of fine-tune runs.")]
MicroBatch = Annotated[
    int, typer.Option(help="Fine-tune: patches per forward pass; gradients accumulate to --batch-size.")
]
Name = Annotated[
    Optional[str], typer.Option(help="A variant beside the default run: runs/<dataset>/<encoder>/<run>-NAME/.")
]
Target = Annotated[
    str,
    typer.Option(help="log1p-cp10k (ours: CP10k, log1p, z-score per gene) or log1p-counts (the reference pipeline)."),
]
TensorBoardOpt = Annotated[
    bool, typer.Option("--tensorboard", help="Also write TensorBoard event files into each run folder (tensorboard/).")
]
LayerOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Train on this intermediate layer of the feature store (tokens_N, from `featcache extract --layers N`; "
        "counted from 1): a variant, runs *-layerN."
    ),
]
Score = Annotated[
    str, typer.Option(help="Bins in loss and metrics: in-tissue (ours) or all-bins (the reference pipeline).")
]
Loss = Annotated[
    str,
    typer.Option(
        help="mse (in target space), poisson or nb (negative binomial, learned per-gene dispersion): the count "
        "losses fit rates of the raw counts with the bin's library size as exposure (runs *-poisson, *-nb)."
    ),
]


@app.command()
@user_errors
def decoder(
    fold: Fold,
    encoder: Annotated[
        Optional[str], typer.Option(help="Encoder (default: every complete feature store of the dataset).")
    ] = None,
    dataset: DatasetOpt = "demo",
    mode: Annotated[
        str, typer.Option(help="frozen (pretrained features) or random (random-init features).")
    ] = "frozen",
    decoder_kind: DecoderOpt = _default("decoder"),
    alpha: AlphaOpt = None,
    control: Annotated[
        Optional[str], typer.Option(help="'shuffled': train on targets shuffled across patches (a control).")
    ] = None,
    epochs: Epochs = _default("epochs"),
    batch_size: Batch = _default("batch_size"),
    lr: Lr = _default("lr"),
    seed: Seed = _default("seed"),
    seeds: Seeds = None,
    val_fraction: ValFrac = _default("val_fraction"),
    target: Target = _default("target"),
    score: Score = _default("score"),
    layer: LayerOpt = None,
    loss: Loss = _default("loss"),
    name: Name = None,
    device: DeviceOpt = "auto",
    in_memory: InMemory = "auto",
    overwrite: OverwriteOpt = False,
    tensorboard: TensorBoardOpt = False,
    workspace: WorkspaceOpt = None,
    features_root: FeaturesRootOpt = None,
):
    """Train the decoder for one fold; write the run folder (config, log, checkpoint, predictions, metrics)."""
    from featcache.stores import Workspace
    from train.loocv import encoders_with_features
    from train.run import train_fold

    workspace = Workspace.resolve(workspace, features_root)
    runs = [
        (e, s)
        for e in ([encoder] if encoder else encoders_with_features(dataset, mode, workspace))
        for s in seed_list(seed, seeds)
    ]
    for enc, one_seed in runs:
        cfg = TrainConfig(
            dataset=dataset,
            encoder=enc,
            fold=fold,
            mode=mode,
            decoder=decoder_kind,
            alpha=alpha,
            control=control,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=one_seed,
            val_fraction=val_fraction,
            target=target,
            score=score,
            layer=layer,
            loss=loss,
            name=name,
        )
        res = train_fold(
            cfg, workspace, device=device, in_memory=in_memory, overwrite=overwrite, tensorboard=tensorboard
        )
        _report(enc, fold, res)


def _report(encoder: str, fold: str, res) -> None:
    m = res.metrics
    if not m:  # a non-main torchrun rank: the main rank reports
        return
    ceil = (m.get("noise_ceiling") or {}).get("pcc_gene")
    out.print(
        f"{encoder} {m['run']} fold {fold}{' (already done)' if res.reused else ''}: pcc_gene {m['pcc_gene']:.3f}, "
        f"pcc_global {m['pcc_global']:.3f}, ssim {m['ssim_st']:.3f}, mse {m['mse']:.3f}"
        + (f", pcc_gene_patch {m['pcc_gene_patch']:.3f}" if m.get("pcc_gene_patch") is not None else "")
        + (
            f" (ridge α {m['ridge']['alpha']:.4g}, {m['ridge']['alpha_rule']}"
            if m.get("ridge")
            else f" (epoch {m['selected_epoch']}"
        )
        + f"; per-gene-mean mse {m['baselines']['per_gene_mean']['mse']:.3f}"
        + (f"; noise ceiling pcc_gene {ceil:.3f}" if ceil is not None else "")
        + ")",
        soft_wrap=True,
    )
    out.print(f"  {res.run_dir}", soft_wrap=True)


@app.command()
@user_errors
def finetune(
    encoder: Annotated[str, typer.Option(help="Encoder to fine-tune (see `featcache encoders`).")],
    fold: Fold,
    dataset: DatasetOpt = "demo",
    weights: Weights = None,
    decoder_kind: DecoderOpt = _default("decoder"),
    epochs: Epochs = _default("epochs"),
    batch_size: Batch = _default("batch_size"),
    micro_batch: MicroBatch = _default("micro_batch"),
    lr: Lr = _default("lr"),
    encoder_lr: EncoderLr = _default("encoder_lr"),
    grad_checkpointing: Annotated[
        bool, typer.Option(help="Recompute encoder activations in backward (less memory).")
    ] = False,
    augment: Annotated[
        bool,
        typer.Option(help="Random 90° turns and flips of image and targets together (a variant: runs *-augment)."),
    ] = False,
    colour_jitter: Annotated[float, typer.Option(help="Brightness / channel-gain jitter strength (0 = off).")] = 0.0,
    seed: Seed = _default("seed"),
    seeds: Seeds = None,
    val_fraction: ValFrac = _default("val_fraction"),
    target: Target = _default("target"),
    score: Score = _default("score"),
    loss: Loss = _default("loss"),
    name: Name = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    tensorboard: TensorBoardOpt = False,
    workspace: WorkspaceOpt = None,
):
    """Fine-tune encoder + decoder end to end from image patches (no feature cache) for one fold."""
    from train.run import train_fold

    for one_seed in seed_list(seed, seeds):
        cfg = TrainConfig(
            dataset=dataset,
            encoder=encoder,
            fold=fold,
            mode="finetune",
            decoder=decoder_kind,
            epochs=epochs,
            batch_size=batch_size,
            micro_batch=micro_batch,
            lr=lr,
            encoder_lr=encoder_lr,
            weights=weights,
            grad_checkpointing=grad_checkpointing,
            augment=augment,
            colour_jitter=colour_jitter,
            seed=one_seed,
            val_fraction=val_fraction,
            target=target,
            score=score,
            loss=loss,
            name=name,
        )
        res = train_fold(cfg, workspace, device=device, in_memory="no", overwrite=overwrite, tensorboard=tensorboard)
        _report(encoder, fold, res)


@app.command()
@user_errors
def summarize(dataset: DatasetOpt = "demo", workspace: WorkspaceOpt = None):
    """Rebuild the comparison file from every finished run folder of the dataset (copied-in ones too)."""
    from train.summary import summarize as run

    print_comparison(run(dataset, workspace))


def print_comparison(res: dict) -> None:
    from train.report import comparison_table

    out.print(comparison_table(res))
    for section in ("incomplete", "inconsistent"):
        for key, why in res.get(section, {}).items():
            out.print(f"not in results ({section}): {key}: {why['reason']}", soft_wrap=True)
    for run in res.get("foreign", []):
        out.print(f"not in results (foreign): {run['run_dir']}: {run['reason']}", soft_wrap=True)
    out.print(f"written: {res['_path']}", soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
