"""The ``featcache`` and ``train`` command lines as people type them: each stage's own commands plus
the ones that span the stages (``featcache demo``, ``featcache predict``, ``train loocv``).

The stages' command lines (featcache/cli.py, train/cli.py, analysis/cli.py) know nothing of each
other; this module copies their commands into the apps the console scripts run and adds the
cross-stage ones, which call functions of this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featcache import cli as featcache_cli
from featcache.cli_common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    OverwriteOpt,
    SeedOpt,
    WeightsOpt,
    WorkspaceOpt,
    make_app,
    out,
    split_list,
    user_errors,
)
from train import cli as train_cli
from train.cli import (
    Batch,
    DecoderOpt,
    EncoderLr,
    Epochs,
    InMemory,
    Lr,
    MicroBatch,
    Name,
    Score,
    Seed,
    Target,
    TensorBoardOpt,
    ValFrac,
    Weights,
    _default,
    print_comparison,
)


def _compose(stage_app: typer.Typer) -> typer.Typer:
    """A new app holding every command of a stage's app (the stage's own app stays as it is)."""
    app = make_app(stage_app.info.help)
    app.registered_commands.extend(stage_app.registered_commands)
    return app


featcache_app = _compose(featcache_cli.app)
train_app = _compose(train_cli.app)


@featcache_app.command()
@user_errors
def demo(
    workspace: WorkspaceOpt = None,
    seed: SeedOpt = 0,
    encoder: Annotated[str, typer.Option(help="Encoder to compare (a small one by default).")] = "tiny-cnn",
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Pretrained weights for --encoder [default: a seeded "
            "random stand-in, since none can be downloaded here]."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of the frozen and random-init runs.")] = 15,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of the fine-tune runs.")] = 3,
):
    """The whole pipeline on a small synthetic 3-patient dataset: synth, prepare, extract, LOOCV, figures.

    LOOCV runs the frozen, random-init and fine-tune modes with few epochs and writes the
    comparison file; everything lands in the workspace, and the end says where.
    """
    from pipeline import comparison_table
    from pipeline import demo as run_demo

    res = run_demo(
        workspace,
        seed=seed,
        encoder=encoder,
        weights=weights,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        on_step=lambda line: out.print(line, soft_wrap=True),
    )
    out.print(comparison_table(res.comparison))
    out.print(f"done in {res.seconds:.0f} s. Where things are:", soft_wrap=True)
    for label, path in res.places.items():
        out.print(f"  {label:26s} {path}", soft_wrap=True)
    out.print(f"open the report in a browser: {res.places['report']}", soft_wrap=True)


@featcache_app.command()
@user_errors
def predict(
    run: Annotated[Path, typer.Option(help="A finished run folder (runs/<dataset>/<encoder>/<run>/fold-<patient>).")],
    image: Annotated[Path, typer.Option(help="The H&E slide (TIFF/BigTIFF/OME-TIFF/SVS, JPEG, PNG).")],
    mpp: Annotated[Optional[float], typer.Option(help="µm per pixel [default: from the image's metadata].")] = None,
    positions: Annotated[
        Optional[Path],
        typer.Option(
            help="A Space Ranger square_008um/ folder (or its outs/): predict on that sample's own lattice and patches."
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Output folder [default: predictions/<run>/<slide>/ in the workspace].")
    ] = None,
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes to draw as maps over the slide.")] = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    min_tissue: Annotated[
        Optional[float],
        typer.Option(
            help="Keep a patch with at least this tissue fraction [default: the "
            "run's dataset with --positions, else 0.01]."
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Rendering threads [default: all cores but two on a GPU (up to 12), two on a CPU]."),
    ] = None,
    overwrite: OverwriteOpt = False,
    workspace: WorkspaceOpt = None,
):
    """Predict a trained run's gene panel on every 8 µm bin of a slide: Zarr, AnnData (.h5ad) and gene maps.

    The encoder weights found (--weights, or where extract looks) must be the ones the run was trained on.
    """
    from pipeline.predict import PredictOptions
    from pipeline.predict import predict as run_predict

    res = run_predict(
        run,
        image,
        PredictOptions(positions=positions, mpp=mpp, min_tissue=min_tissue, genes=tuple(split_list(genes or ""))),
        weights=weights,
        workspace=workspace,
        output=output,
        batch_size=batch_size,
        device=device,
        workers=workers,
        overwrite=overwrite,
    )
    out.print(
        f"predicted {res.bins} bins in {res.patches} patches at {res.tiles_per_s:.1f} tiles/s: {res.path}",
        soft_wrap=True,
    )
    for f in res.figures:
        out.print(f"  {f}", soft_wrap=True)


@train_app.command()
@user_errors
def loocv(
    encoders: Annotated[str, typer.Option(help="Comma-separated encoders.")],
    modes: Annotated[str, typer.Option(help="Comma-separated modes: frozen, random, finetune.")] = "frozen",
    weights: Weights = None,
    encoder_lr: EncoderLr = _default("encoder_lr"),
    micro_batch: MicroBatch = _default("micro_batch"),
    dataset: DatasetOpt = "demo",
    decoder_kind: DecoderOpt = _default("decoder"),
    jobs: Annotated[int, typer.Option(help="Folds trained at once (processes).")] = 1,
    epochs: Epochs = _default("epochs"),
    batch_size: Batch = _default("batch_size"),
    lr: Lr = _default("lr"),
    seed: Seed = _default("seed"),
    val_fraction: ValFrac = _default("val_fraction"),
    target: Target = _default("target"),
    score: Score = _default("score"),
    name: Name = None,
    device: DeviceOpt = "auto",
    in_memory: InMemory = "auto",
    overwrite: OverwriteOpt = False,
    tensorboard: TensorBoardOpt = False,
    workspace: WorkspaceOpt = None,
):
    """Every fold (each patient as the test patient) of every encoder and mode; then the comparison file.

    Random-init features are extracted (seeded with --seed) when missing.
    """
    from pipeline import loocv as run

    options = dict(
        decoder=decoder_kind,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        val_fraction=val_fraction,
        weights=weights,
        encoder_lr=encoder_lr,
        micro_batch=micro_batch,
        target=target,
        score=score,
        name=name,
    )
    print_comparison(
        run(
            dataset,
            split_list(encoders),
            split_list(modes),
            options,
            jobs=jobs,
            workspace=workspace,
            device=device,
            in_memory=in_memory,
            overwrite=overwrite,
            tensorboard=tensorboard,
        )
    )


def featcache_main() -> None:  # console script `featcache`
    featcache_app()


def train_main() -> None:  # console script `train`
    train_app()
