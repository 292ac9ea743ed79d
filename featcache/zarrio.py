"""Small helpers for the Zarr v3 stores every stage writes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec


def compressors(level: int = 3):
    """zstd compression followed by a CRC32C checksum of each stored chunk."""
    return [ZstdCodec(level=level), Crc32cCodec()]


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype,
    dims: Sequence[str],
    level: int = 3,
    fill_value=0,
    attributes: dict | None = None,
) -> zarr.Array:
    """Create a compressed, checksummed array whose dimension names xarray will pick up."""
    if len(dims) != len(shape):
        raise ValueError(f"{name}: {len(dims)} dimension names for {len(shape)} dimensions")
    return group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        dimension_names=list(dims),
        compressors=compressors(level),
        fill_value=fill_value,
        attributes=attributes or {},
    )


def write_strings(group: zarr.Group, name: str, values: Sequence[str], dim: str) -> zarr.Array:
    """A 1-D variable-length string array (used for gene names and ids as coordinates)."""
    values = np.asarray(list(values), dtype=str)
    arr = group.create_array(name, shape=values.shape, dtype=str, dimension_names=[dim])
    arr[:] = values
    return arr


def consolidate(path: Path) -> None:
    """Consolidate a store's metadata so xarray opens it with one read (zarr-python's v3 extension)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(zarr.storage.LocalStore(path))
