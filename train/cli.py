"""The ``train`` command line (stage 2): the shared decoder on cached token grids, LOOCV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from featcache.cli import WorkspaceOpt, user_errors

app = typer.Typer(
    help="train: fit the shared Img2ST-Net decoder on cached token grids, leave-one-patient-out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 140)

Epochs = Annotated[int, typer.Option(help="Training epochs (the reference study used 200).")]
Batch = Annotated[int, typer.Option(help="Patches per step.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate (no weight decay).")]
Seed = Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling (recorded).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
ValFrac = Annotated[float, typer.Option(help="Share of training-patient patches held out (spatial blocks) for epoch selection.")]
InMemory = Annotated[str, typer.Option(help="auto (load the training set when it fits 40 % of RAM), yes, no.")]
Decoder = Annotated[str, typer.Option(help="unet (Img2ST-Net MiniUNet) or linear (per-token 1×1 baseline).")]


@app.command()
@user_errors
def decoder(
    fold: Annotated[str, typer.Option(help="The test patient (a sample of the dataset).")],
    encoder: Annotated[Optional[str], typer.Option(help="Encoder [default: every complete feature store of the dataset].")] = None,
    dataset: Annotated[str, typer.Option(help="Prepared dataset.")] = "demo",
    mode: Annotated[str, typer.Option(help="frozen (pretrained features) or random (random-init features).")] = "frozen",
    decoder_kind: Annotated[str, typer.Option("--decoder", help="unet or linear.")] = "unet",
    control: Annotated[Optional[str], typer.Option(help="'shuffled': train on targets shuffled across patches (a control).")] = None,
    epochs: Epochs = 200, batch_size: Batch = 64, lr: Lr = 1e-4, seed: Seed = 0, device: Device = "auto",
    val_fraction: ValFrac = 0.15, in_memory: InMemory = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a run folder made with other settings.")] = False,
    workspace: WorkspaceOpt = None,
):
    """Train the decoder for one fold; write the run folder (config, log, checkpoint, predictions, metrics)."""
    from train.run import train_fold

    encoders = [encoder] if encoder else _complete_stores(dataset, workspace, mode)
    for enc in encoders:
        res = train_fold(dataset, enc, fold, mode=mode, decoder=decoder_kind, epochs=epochs, batch_size=batch_size,
                         lr=lr, seed=seed, device=device, val_fraction=val_fraction, in_memory=in_memory,
                         control=control, workspace=workspace, overwrite=overwrite)
        _report(enc, fold, res)


def _report(encoder: str, fold: str, res) -> None:
    m = res.metrics
    if not m:  # a non-main torchrun rank: the main rank reports
        return
    ceil = (m.get("noise_ceiling") or {}).get("pcc_gene")
    out.print(f"{encoder} {m['run']} fold {fold}{' (already done)' if res.reused else ''}: pcc_gene {m['pcc_gene']:.3f}, "
              f"pcc_global {m['pcc_global']:.3f}, ssim {m['ssim_st']:.3f}, mse {m['mse']:.3f} "
              f"(epoch {m['selected_epoch']}; per-gene-mean mse {m['baselines']['per_gene_mean']['mse']:.3f}"
              + (f"; noise ceiling pcc_gene {ceil:.3f}" if ceil is not None else "") + ")", soft_wrap=True)
    out.print(f"  {res.run_dir}", soft_wrap=True)


@app.command()
@user_errors
def finetune(
    encoder: Annotated[str, typer.Option(help="Encoder to fine-tune (see `featcache encoders`).")],
    fold: Annotated[str, typer.Option(help="The test patient (a sample of the dataset).")],
    dataset: Annotated[str, typer.Option(help="Prepared dataset.")] = "demo",
    weights: Annotated[Optional[str], typer.Option(help="Pretrained weights (file, folder), or random[:SEED].")] = None,
    decoder_kind: Annotated[str, typer.Option("--decoder", help="unet or linear.")] = "unet",
    epochs: Epochs = 200, batch_size: Annotated[int, typer.Option(help="Effective batch (patches per optimizer step).")] = 64,
    micro_batch: Annotated[Optional[int], typer.Option(help="Patches per forward pass; gradients accumulate to --batch-size.")] = 16,
    lr: Annotated[float, typer.Option(help="Decoder learning rate.")] = 1e-4,
    encoder_lr: Annotated[float, typer.Option(help="Encoder learning rate.")] = 1e-5,
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute encoder activations in backward (less memory).")] = False,
    augment: Annotated[bool, typer.Option(help="Random 90° rotations and flips of image and targets together.")] = True,
    colour_jitter: Annotated[float, typer.Option(help="Brightness / channel-gain jitter strength (0 = off).")] = 0.0,
    seed: Seed = 0, device: Device = "auto", val_fraction: ValFrac = 0.15,
    overwrite: Annotated[bool, typer.Option(help="Replace a run folder made with other settings.")] = False,
    workspace: WorkspaceOpt = None,
):
    """Fine-tune encoder + decoder end to end from image patches (no feature cache) for one fold."""
    from train.run import train_fold

    res = train_fold(dataset, encoder, fold, mode="finetune", decoder=decoder_kind, epochs=epochs,
                     batch_size=batch_size, micro_batch=min(micro_batch or batch_size, batch_size), lr=lr,
                     encoder_lr=encoder_lr, grad_checkpointing=grad_checkpointing, augment=augment,
                     jitter=colour_jitter, seed=seed, device=device, val_fraction=val_fraction, in_memory="no",
                     weights=weights, workspace=workspace, overwrite=overwrite)
    _report(encoder, fold, res)


@app.command()
@user_errors
def loocv(
    encoders: Annotated[str, typer.Option(help="Comma-separated encoders.")],
    modes: Annotated[str, typer.Option(help="Comma-separated modes: frozen, random, finetune.")] = "frozen",
    weights: Annotated[Optional[str], typer.Option(help="Pretrained weights for finetune runs (one encoder).")] = None,
    encoder_lr: Annotated[float, typer.Option(help="Encoder learning rate of finetune runs.")] = 1e-5,
    micro_batch: Annotated[Optional[int], typer.Option(help="Finetune: patches per forward pass (gradient accumulation).")] = None,
    dataset: Annotated[str, typer.Option(help="Prepared dataset.")] = "demo",
    decoder_kind: Annotated[str, typer.Option("--decoder", help="unet or linear.")] = "unet",
    jobs: Annotated[int, typer.Option(help="Folds trained at once (processes).")] = 1,
    epochs: Epochs = 200, batch_size: Batch = 64, lr: Lr = 1e-4, seed: Seed = 0, device: Device = "auto",
    val_fraction: ValFrac = 0.15, in_memory: InMemory = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace run folders made with other settings.")] = False,
    workspace: WorkspaceOpt = None,
):
    """Every fold (each sample as the test patient) of every encoder and mode; the comparison file."""
    from train.loocv import run_loocv

    res = run_loocv(dataset, _split(encoders), _split(modes), jobs=jobs, workspace=workspace, decoder=decoder_kind,
                    epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                    val_fraction=val_fraction, in_memory=in_memory, overwrite=overwrite,
                    finetune_options={"weights": weights, "encoder_lr": encoder_lr, "micro_batch": micro_batch})
    print_comparison(res)


def print_comparison(res: dict) -> None:
    table = Table(title=f"leave-one-patient-out, dataset {res['summary']['dataset']!r} (mean ± std over folds)")
    for col in ("run", "pcc_gene", "pearson_r", "spearman", "ssim_st", "mse", "noise ceiling"):
        table.add_column(col, no_wrap=True)
    fmt = lambda s: "—" if s.get("mean") is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    rows = sorted(res["results"].items(), key=lambda kv: -(kv[1]["pcc_gene"]["mean"] or -9))
    for name, r in rows:
        table.add_row(name, fmt(r["pcc_gene"]), fmt(r["pearson_r"]), fmt(r["spearman_rho"]), fmt(r["ssim_st"]),
                      fmt(r["mse"]), fmt(r.get("noise_ceiling_pcc_gene", {})))
    out.print(table)
    out.print(f"written: {res['_path']}", soft_wrap=True)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _complete_stores(dataset: str, workspace, mode: str) -> list[str]:
    from featcache.catalog import list_stores
    from featcache.errors import FeatcacheError
    from featcache.workspace import Workspace

    ws = Workspace.resolve(workspace)
    names = []
    for st in list_stores(ws, dataset):
        name = Path(st.location).stem
        if st.complete and (name.endswith("-random") == (mode == "random")):
            names.append(name.removesuffix("-random"))
    if not names:
        raise FeatcacheError(f"no complete feature store for dataset {dataset!r} in {ws.root}; make one with "
                             f"`featcache extract --dataset {dataset} --encoder NAME`" + (" --weights random" if mode == "random" else "") + ".")
    return names


def main() -> None:
    app()


if __name__ == "__main__":
    main()
