"""The ``train`` command line (stage 2). Decoder training arrives with the decoder issue."""

import typer

app = typer.Typer(
    help="train: fit the shared Img2ST-Net decoder on cached token grids, leave-one-patient-out.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Stage 2 of featcache (not built yet: see README, 'Status')."""


def main() -> None:
    app()
