"""What every result records about where it came from: library versions; small JSON helpers."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from featcache import __version__

LIBRARIES = ("numpy", "zarr", "numcodecs", "tifffile", "xarray", "dask", "torch", "timm")


def library_versions() -> dict:
    """Versions of featcache, Python and the libraries that shape stored values (from package metadata)."""
    out = {"featcache": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
