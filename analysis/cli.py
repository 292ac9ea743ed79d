"""The ``analysis`` command line (stage 3): comparison figures and spatial maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featcache.cli_common import (
    DatasetOpt,
    FeaturesRootOpt,
    OverwriteOpt,
    SeedOpt,
    WorkspaceOpt,
    make_app,
    out,
    split_list,
    user_errors,
)

app = make_app("analysis: compare encoders and draw the figures from a workspace's results.")


@app.command()
@user_errors
def figures(
    dataset: DatasetOpt = "demo",
    sample: Annotated[
        Optional[str], typer.Option(help="Test patient of the spatial rows (default: the last fold).")
    ] = None,
    genes: Annotated[
        Optional[str],
        typer.Option(
            help="Genes of the spatial rows, all in the panel (default: EPCAM,DES,CD74,COL1A1,MT-CO3,MUC12 where in "
            "it; with none of them, the panel's 6 best by the runs' PCC)."
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
):
    """Draw the comparison figures and spatial maps (PNG and PDF) into results/<dataset>/figures/."""
    from analysis.figures import draw_all

    def told(chosen, how):
        out.print(f"spatial rows of {', '.join(chosen)} ({how})", soft_wrap=True, markup=False)

    written = draw_all(dataset, sample, split_list(genes) if genes else None, workspace, on_genes=told)
    folder = written[0].parent if written else None
    out.print(f"wrote {len(written)} files to {folder}", soft_wrap=True)


@app.command()
@user_errors
def compare(
    dataset: DatasetOpt = "demo",
    runs: Annotated[
        Optional[str], typer.Option(help="Comma-separated runs of the comparison file (default: all).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of spatial blocks (at least 100).")] = 2000,
    block_bins: Annotated[int, typer.Option(help="Side of a spatial block of the bootstrap, in bins.")] = 64,
    seed: SeedOpt = 0,
    workspace: WorkspaceOpt = None,
):
    """Paired statistics for every pair of runs: the pcc_gene difference with an interval over test blocks and seeds."""
    from analysis.compare import comparison_figure, paired_comparison
    from featcache.stores import Workspace

    res = paired_comparison(
        dataset, split_list(runs) if runs else None, workspace, n_boot=bootstrap, seed=seed, block_bins=block_bins
    )
    for p in res["pairs"]:
        out.print(
            f"{p['b']} − {p['a']}: Δ pcc_gene {p['mean_pcc_gene_difference']:+.4f} "
            f"95 % [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
            f" ({'excludes' if p['excludes_zero'] else 'includes'} 0); {p['genes_favouring_b']}/{p['n_genes']} "
            f"genes favour {p['b']} (descriptive)" + "".join(f"; {n}" for n in p["notes"]),
            soft_wrap=True,
            highlight=False,
        )
    figures = comparison_figure(res, Workspace.resolve(workspace).results(dataset).figures_dir)
    out.print(f"written: {res['_path']} and {figures[0]}", soft_wrap=True)


@app.command()
@user_errors
def export(
    run: Annotated[Optional[Path], typer.Option(help="A finished run folder: its test predictions and truth.")] = None,
    features: Annotated[
        Optional[str],
        typer.Option(help="A feature store of --dataset (e.g. uni2h, uni2h-random): its pooled embeddings per patch."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="The dataset of --features.")] = "demo",
    output: Annotated[
        Optional[Path], typer.Option(help="The .h5ad to write (default: results/<dataset>/exports/...).")
    ] = None,
    overwrite: OverwriteOpt = False,
    workspace: WorkspaceOpt = None,
    features_root: FeaturesRootOpt = None,
):
    """AnnData (.h5ad) for scanpy: a run's test predictions and truth, or a feature store's pooled features."""
    from analysis.export import export_h5ad
    from featcache.stores import Workspace

    path, adata = export_h5ad(run, features, dataset, output, overwrite, Workspace.resolve(workspace, features_root))
    out.print(f"wrote {adata.n_obs} × {adata.n_vars} AnnData: {path}", soft_wrap=True)


@app.command()
@user_errors
def report(
    dataset: DatasetOpt = "demo",
    genes: Annotated[
        Optional[str],
        typer.Option(help="Genes of the spatial maps (default: up to 3 of the default markers in the panel)."),
    ] = None,
    workspace: WorkspaceOpt = None,
):
    """The whole benchmark on one page: results/<dataset>/report/index.html (self-contained, opens offline)."""
    from analysis.report import write_report

    path = write_report(dataset, split_list(genes) if genes else None, workspace)
    out.print(f"report: {path}", soft_wrap=True)


@app.callback()
def _root() -> None:
    """Stage 3 of featcache: figures and xarray views (`import analysis` in a notebook)."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
