"""The ``analysis`` command line (stage 3): comparison figures and spatial maps."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from featcache.cli_common import WorkspaceOpt, make_app, out, split_list, user_errors

app = make_app("analysis: compare encoders and draw the figures from a workspace's results.")


@app.command()
@user_errors
def figures(
    dataset: Annotated[str, typer.Option(help="Dataset whose results to draw.")] = "demo",
    sample: Annotated[
        Optional[str], typer.Option(help="Test patient of the spatial rows [default: the last fold].")
    ] = None,
    genes: Annotated[str, typer.Option(help="Genes of the spatial rows.")] = "EPCAM,DES,CD74,COL1A1,MT-CO3,MUC12",
    workspace: WorkspaceOpt = None,
):
    """Draw the comparison figures and spatial maps (PNG and PDF) into results/<dataset>/figures/."""
    from analysis.figures import draw_all

    written = draw_all(dataset, sample, split_list(genes), workspace)
    folder = written[0].parent if written else None
    out.print(f"wrote {len(written)} files to {folder}", soft_wrap=True)


@app.callback()
def _root() -> None:
    """Stage 3 of featcache: figures and xarray views (`import analysis` in a notebook)."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
