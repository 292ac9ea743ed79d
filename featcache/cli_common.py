"""What the three command lines share: the options they have in common, consoles, and one-line errors."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from featcache.errors import FeatcacheError

out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)

# Options that mean the same in every command that has them, defined once.
WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace root (default: $FEATCACHE_WORKSPACE or ./featcache-data)."),
]
FeaturesRootOpt = Annotated[
    Optional[str],
    typer.Option(
        "--features-root",
        help="Where feature stores live, <root>/<dataset>/<encoder>.zarr: a folder or an fsspec URL "
        "(s3://bucket/prefix, gs://...); storage options from $FEATCACHE_STORAGE_OPTIONS (JSON), credentials "
        "from the backend's environment (AWS_*) (default: $FEATCACHE_FEATURES_ROOT or the workspace's features/).",
    ),
]
DatasetOpt = Annotated[str, typer.Option(help="A prepared dataset of the workspace (`featcache datasets` lists them).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
BatchOpt = Annotated[int, typer.Option(help="Patches per forward pass.")]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Encoder weights: a checkpoint file or a folder holding one, or random[:SEED] for random-init "
        "(default: $FEATCACHE_WEIGHTS/<encoder>/ or the Hugging Face cache)."
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Random seed: the same seed gives the same result.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        help="Replace an existing result of the same name (dataset, store, run folder, file) instead of refusing."
    ),
]


def make_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _os_error_message(exc: OSError) -> str | None:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        return f"the disk is full{where}. Free some space and run the same command again; it resumes or starts clean."
    if exc.errno == errno.EDQUOT:
        return f"the disk quota is exhausted{where}. Free some space and run the same command again."
    if exc.errno in (errno.EROFS,):
        return f"the file system is read-only{where}; choose a writable --workspace."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; choose a --workspace (or --output) you can write to."
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG):
        return f"{exc.strerror.lower()}{where}; a folder featcache needs is blocked by a file (or the path is invalid)."
    if exc.errno == errno.EIO:
        return f"an input/output error{where}: the disk or network file system failed; check it and run again."
    return None


def user_errors(fn):
    """Print a FeatcacheError (or a full disk, a read-only or unwritable folder) as one line; exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            message = _os_error_message(exc)
            if message is None:
                raise
            err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing incomplete was left in place.")
            raise typer.Exit(130) from None

    return wrapper


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]
