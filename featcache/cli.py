"""The ``featcache`` command line (stage 1: data preparation and feature caching)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from featcache.errors import FeatcacheError

app = typer.Typer(
    help="featcache: cut bin-aligned H&E patches from Visium HD outputs and cache encoder token grids.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace root [default: $FEATCACHE_WORKSPACE or ./featcache-data]."),
]


def user_errors(fn):
    """Print a FeatcacheError as one line and exit non-zero, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing incomplete was left in place.")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the samples into.")],
    samples: Annotated[str, typer.Option(help="Comma-separated sample (patient) names.")] = "P1,P2,P5",
    seed: Annotated[int, typer.Option(help="Random seed; the dataset is identical for the same seed.")] = 0,
    rows: Annotated[int, typer.Option(help="8 µm bins along array_row per sample.")] = 128,
    cols: Annotated[int, typer.Option(help="8 µm bins along array_col per sample.")] = 160,
    genes: Annotated[int, typer.Option(help="Genes in the synthetic panel (≥ 64).")] = 250,
):
    """Write a synthetic Visium HD dataset in Space Ranger's on-disk layout."""
    from featcache.synth import SynthConfig, synthesize

    names = [s.strip() for s in samples.split(",") if s.strip()]
    cfg = SynthConfig(rows=rows, cols=cols, n_genes=genes, seed=seed)
    with err.status("synthesizing ...") as status:
        reports = synthesize(out_dir, names, cfg, on_sample=lambda r: status.update(f"wrote {r['sample']}"))
    table = Table(title=f"synthetic Visium HD dataset in {out_dir}")
    for col in ("sample", "in-tissue bins", "median UMIs/bin", "image (px)", "grid rotation"):
        table.add_column(col)
    for r in reports:
        table.add_row(r["sample"], str(r["in_tissue_bins"]), f"{r['median_umis']:.0f}",
                      "×".join(map(str, r["image_shape"])), f"{r['rotation_deg']:+.2f}°" + (" flipped" if r["flip_rows"] else ""))
    out.print(table)


@app.command()
@user_errors
def prepare(
    dataset: Annotated[str, typer.Option(help="Name of the dataset to create in the workspace.")],
    sample: Annotated[list[str], typer.Option(help="NAME=DIR: a Space Ranger output (folder with outs/). Repeat per sample.")],
    image: Annotated[Optional[list[str]], typer.Option(help="NAME=FILE: full-resolution H&E when not found next to outs/.")] = None,
    genes: Annotated[str, typer.Option(help="Gene panel: top-mean:N, or a file with one gene name or id per line.")] = "top-mean:50",
    stride: Annotated[int, typer.Option(help="Step between patch origins, in 8 µm bins.")] = 32,
    min_tissue: Annotated[float, typer.Option(help="Keep a patch when at least this fraction of its bins is in tissue.")] = 0.5,
    workers: Annotated[Optional[int], typer.Option(help="Rendering threads [default: up to 4].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset of this name made from other inputs.")] = False,
    workspace: WorkspaceOpt = None,
):
    """Cut bin-aligned 448 px patches and per-bin targets into Zarr stores."""
    from featcache.prepare import parse_pairs, prepare_dataset

    res = prepare_dataset(
        dataset, parse_pairs(sample, "--sample"), parse_pairs(image, "--image"), genes=genes, stride=stride,
        min_tissue=min_tissue, workspace=workspace, overwrite=overwrite, workers=workers,
    )
    if res.up_to_date:
        out.print(f"dataset {dataset!r} is up to date at {res.path}; nothing to do.")
        return
    total = sum(res.patches.values())
    out.print(f"prepared dataset {dataset!r}: {total} patches ("
              + ", ".join(f"{k} {v}" for k, v in res.patches.items())
              + f"), {res.genes} genes, in {res.seconds:.1f} s")
    out.print(f"  {res.path / 'patches.zarr'}\n  {res.path / 'targets.zarr'}\n  {res.path / 'dataset.json'}")


@app.command()
@user_errors
def demo(
    workspace: WorkspaceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic dataset.")] = 0,
):
    """Run the pipeline on a small built-in synthetic dataset (3 patients), end to end."""
    from featcache.prepare import prepare_dataset
    from featcache.synth import SynthConfig, synthesize
    from featcache.workspace import Workspace

    ws = Workspace.resolve(workspace)
    raw = ws.root / "raw" / f"demo-seed{seed}"
    names = ["P1", "P2", "P5"]
    if not all((raw / n / "outs").is_dir() for n in names):
        with err.status(f"synthesizing 3 Visium HD samples into {raw} ..."):
            synthesize(raw, [n for n in names if not (raw / n).exists()], SynthConfig(seed=seed))
    res = prepare_dataset("demo", {n: str(raw / n) for n in names}, workspace=ws.root, overwrite=True)
    out.print(f"[bold]demo[/]: prepared dataset 'demo' with {sum(res.patches.values())} patches "
              f"({', '.join(f'{k} {v}' for k, v in res.patches.items())}) and {res.genes} genes")
    out.print(f"  raw Space Ranger layout: {raw}")
    out.print(f"  patches and targets:     {res.path}")


@app.command()
@user_errors
def datasets(workspace: WorkspaceOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """List the prepared datasets in the workspace."""
    from featcache.workspace import Workspace

    ws = Workspace.resolve(workspace)
    rows = []
    for p in sorted((ws.root / "datasets").glob("*/dataset.json")) if (ws.root / "datasets").is_dir() else []:
        meta = json.loads(p.read_text())
        rows.append({"dataset": meta["dataset"], "samples": {k: v["n_patches"] for k, v in meta["samples"].items()},
                     "genes": len(meta["genes"]["ids"]), "path": str(p.parent)})
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        out.print(f"no prepared datasets in {ws.root}")
        return
    table = Table(title=f"datasets in {ws.root}")
    for col in ("dataset", "patches per sample", "genes", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["dataset"], ", ".join(f"{k} {v}" for k, v in r["samples"].items()), str(r["genes"]), r["path"])
    out.print(table)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
