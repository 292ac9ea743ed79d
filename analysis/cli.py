"""The ``analysis`` command line (stage 3). Figures arrive with the analysis issue."""

import typer

app = typer.Typer(
    help="analysis: compare encoders and draw the figures from a workspace's results.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Stage 3 of featcache (not built yet: see README, 'Status')."""


def main() -> None:
    app()
