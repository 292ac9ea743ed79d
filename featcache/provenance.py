"""What every result records about where it came from: the versions of the libraries that made it."""

from __future__ import annotations

import platform
from importlib import metadata

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
