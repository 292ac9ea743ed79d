"""The ``featcache`` and ``train`` command lines as people type them: each stage's own commands plus
the ones that span the stages (``featcache demo``, ``featcache predict``, ``train loocv``).

The stages' command lines (featcache/cli.py, train/cli.py, analysis/cli.py) know nothing of each
other; this module copies their commands into the apps the console scripts run and adds the
cross-stage ones, which call functions of this package.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from featcache import cli as featcache_cli
from featcache.cli_common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    FeaturesRootOpt,
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
    AlphaOpt,
    Batch,
    DecoderOpt,
    EncoderLr,
    Epochs,
    InMemory,
    LayerOpt,
    Loss,
    Lr,
    MicroBatch,
    Name,
    Score,
    Seed,
    Seeds,
    Target,
    TensorBoardOpt,
    ValFrac,
    Weights,
    _default,
    print_comparison,
    seed_list,
)


def _compose(stage_app: typer.Typer) -> typer.Typer:
    """A new app holding every command of a stage's app (the stage's own app stays as it is)."""
    app = make_app(stage_app.info.help)
    app.registered_commands.extend(stage_app.registered_commands)
    return app


featcache_app = _compose(featcache_cli.app)
train_app = _compose(train_cli.app)


def _extracting_random_stores(decoder):
    """`train decoder --mode random --encoder E --seeds 0,1`: the random-init stores of the seeds, drawn per seed,
    are extracted first when missing (the stage's own command refuses them, naming the extract command)."""

    @functools.wraps(decoder)
    @user_errors
    def run(**options):
        if options.get("mode") == "random" and options.get("encoder"):
            from dataclasses import fields

            from featcache.stores import Workspace
            from pipeline import random_stores
            from train.config import TrainConfig

            seeds = seed_list(options["seed"], options.get("seeds"))
            settings = {f.name: options.get(f.name) for f in fields(TrainConfig) if f.name in options}
            for seed in seeds:  # bad settings are refused before anything is extracted
                TrainConfig.from_options(
                    **{**settings, "decoder": options.get("decoder_kind"), "seed": seed}
                ).validate()
            ws = Workspace.resolve(options.get("workspace"), options.get("features_root"))
            random_stores(options["dataset"], [options["encoder"]], seeds, options.get("layer"), ws, options["device"])
        return decoder(**options)

    return run


for _k, _command in enumerate(train_app.registered_commands):
    if _command.callback is train_cli.decoder:  # a copy: the stage's own app keeps its command
        train_app.registered_commands[_k] = copy.copy(_command)
        train_app.registered_commands[_k].callback = _extracting_random_stores(train_cli.decoder)


@featcache_app.command()
@user_errors
def demo(
    workspace: WorkspaceOpt = None,
    seed: SeedOpt = 0,
    encoder: Annotated[str, typer.Option(help="Encoder to compare (a small one by default).")] = "tiny-cnn",
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Pretrained weights for --encoder (default: tiny-cnn's, which featcache ships "
            "(featcache/pretrain.py); a seeded random stand-in for other encoders)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of the frozen and random-init runs.")] = 15,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of the fine-tune runs.")] = 15,
    n_seeds: Annotated[
        int, typer.Option(help="Training seeds per run (--seed, --seed+1, ...): each its own run folder.")
    ] = 2,
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
        n_seeds=n_seeds,
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
    mpp: Annotated[Optional[float], typer.Option(help="µm per pixel (default: from the image's metadata).")] = None,
    positions: Annotated[
        Optional[Path],
        typer.Option(
            help="A Space Ranger square_008um/ folder (or its outs/): predict on that sample's own lattice and patches."
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Output folder (default: predictions/<run>/<slide>/ in the workspace).")
    ] = None,
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes to draw as maps over the slide.")] = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    min_tissue: Annotated[
        Optional[float],
        typer.Option(
            help="Keep a patch with at least this tissue fraction (default: the "
            "run's dataset with --positions, else 0.01)."
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Rendering threads (default: all cores but two on a GPU (up to 12), two on a CPU)."),
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
    for note in res.notes:
        out.print(f"note: {note}", soft_wrap=True, markup=False)


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
    alpha: AlphaOpt = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Folds trained at once: 1 in this process; N a local Dask cluster of N worker processes "
            "(with --slurm-*: N Slurm jobs, one worker each)."
        ),
    ] = 1,
    scheduler: Annotated[
        Optional[str],
        typer.Option(help="A running Dask scheduler (tcp://HOST:PORT) whose workers train the folds."),
    ] = None,
    slurm_partition: Annotated[
        Optional[str], typer.Option(help="Start --jobs Dask workers as Slurm jobs on this partition.")
    ] = None,
    slurm_gpus: Annotated[int, typer.Option(help="GPUs per Slurm job (tasks then need a GPU).")] = 0,
    slurm_memory: Annotated[Optional[str], typer.Option(help="Memory per Slurm job, e.g. 32GB.")] = None,
    slurm_walltime: Annotated[Optional[str], typer.Option(help="Time limit per Slurm job, e.g. 04:00:00.")] = None,
    slurm_config: Annotated[
        Optional[Path], typer.Option(help="YAML of SLURMCluster settings (dask-jobqueue's format).")
    ] = None,
    slurm_script: Annotated[
        bool, typer.Option(help="Print the Slurm job script each worker would be submitted with, then stop.")
    ] = False,
    epochs: Epochs = _default("epochs"),
    batch_size: Batch = _default("batch_size"),
    lr: Lr = _default("lr"),
    seed: Seed = _default("seed"),
    seeds: Seeds = None,
    lr_grid: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated learning rates, e.g. 1e-4,3e-4,1e-3: each is trained for every fold and the best "
            "on the training patients' validation region is kept per fold (the same budget for every encoder)."
        ),
    ] = None,
    augment: Annotated[
        bool, typer.Option(help="Fine-tune runs: dihedral augmentation (a variant: runs *-augment).")
    ] = False,
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
    """Every fold (each patient as the test patient) of every encoder and mode; then the comparison file.

    Random-init features are extracted (random:<seed>, one store per seed) when missing.
    """
    from featcache.stores import Workspace
    from pipeline import loocv as run

    options = dict(
        decoder=decoder_kind,
        alpha=alpha,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seeds=seed_list(seed, seeds),
        lr_grid=_lr_grid(lr_grid),
        augment=augment or None,
        val_fraction=val_fraction,
        weights=weights,
        encoder_lr=encoder_lr,
        micro_batch=micro_batch,
        target=target,
        score=score,
        layer=layer,
        loss=loss,
        name=name,
    )
    slurm = None
    if slurm_partition or slurm_config or slurm_gpus or slurm_memory or slurm_walltime:
        slurm = dict(
            partition=slurm_partition,
            gpus=slurm_gpus,
            memory=slurm_memory,
            walltime=slurm_walltime,
            config=str(slurm_config) if slurm_config else None,
        )
    if slurm_script:  # nothing is submitted: see what --slurm-* would ask Slurm for
        from train.slurm import slurm_cluster

        cluster = slurm_cluster(**(slurm or {}))
        try:
            print(cluster.job_script())
        finally:
            cluster.close()
        return
    comparison = run(
        dataset,
        split_list(encoders),
        split_list(modes),
        options,
        jobs=jobs,
        workspace=Workspace.resolve(workspace, features_root),
        device=device,
        in_memory=in_memory,
        overwrite=overwrite,
        scheduler=scheduler,
        slurm=slurm,
        tensorboard=tensorboard,
    )
    print_comparison(comparison)
    out.print("[bold]where the folds ran[/] (fold, worker, seconds):")
    for line in comparison["_placement"]:
        out.print(f"  {line}", soft_wrap=True, markup=False)


def _lr_grid(text: str | None) -> list[float] | None:
    from featcache.errors import FeatcacheError

    if text is None:
        return None
    try:
        return [float(v) for v in split_list(text)] or None
    except ValueError:
        raise FeatcacheError(
            f"--lr-grid {text!r}: write learning rates separated by commas, e.g. 1e-4,3e-4,1e-3."
        ) from None


def featcache_main() -> None:  # console script `featcache`
    featcache_app()


def train_main() -> None:  # console script `train`
    train_app()
