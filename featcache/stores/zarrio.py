"""Low-level helpers for the Zarr v3 stores of the store layer: arrays with dimension names, codecs, chunks."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec


def compressors(level: int = 3):
    """zstd compression followed by a CRC32C checksum of each stored chunk."""
    return [ZstdCodec(level=level), Crc32cCodec()]


def _blosc_zstd(level: int):
    return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=2)


# Encodings considered for float16 token chunks, all standard Zarr v3 codecs; each carries a
# checksum verified on every read: zstd's own frame checksum (computed inside the compressor, in
# zarr's worker threads) or a separate crc32c codec (computed, with a copy of the chunk, in
# zarr's single event-loop thread, which capped extraction writes; benchmarks/RESULTS.md).
# Each preset: (filters, compressors).
TOKEN_CODECS = {
    "zstd1": ([], [ZstdCodec(level=1, checksum=True)]),
    "zstd3": ([], [ZstdCodec(level=3, checksum=True)]),
    "zstd1+crc32c": ([], [ZstdCodec(level=1), Crc32cCodec()]),
    "shuffle-zstd1+crc32c": ([], [_blosc_zstd(1), Crc32cCodec()]),
}
DEFAULT_TOKEN_CODEC = "zstd1"


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
    codec: str | None = None,
) -> zarr.Array:
    """Create a compressed, checksummed array whose dimension names xarray will pick up.

    ``codec`` names a TOKEN_CODECS preset; otherwise zstd at ``level`` plus CRC32C.
    """
    if len(dims) != len(shape):
        raise ValueError(f"{name}: {len(dims)} dimension names for {len(shape)} dimensions")
    filters, comps = TOKEN_CODECS[codec] if codec else ([], compressors(level))
    return group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        dimension_names=list(dims),
        filters=filters,
        compressors=comps,
        # Every chunk we write is real data: skip zarr's per-chunk "all fill value?" comparison,
        # which costs more than compressing (measured in benchmarks/extract.py). A runtime setting:
        # it is not stored, so code that reopens an array to write sets it again (extract.py).
        config={"write_empty_chunks": True},
        fill_value=fill_value,
        attributes=attributes or {},
    )


def write_strings(group: zarr.Group, name: str, values: Sequence[str], dim: str) -> zarr.Array:
    """A 1-D variable-length string array (used for gene names and ids as coordinates)."""
    values = np.asarray(list(values), dtype=str)
    arr = group.create_array(name, shape=values.shape, dtype=str, dimension_names=[dim])
    arr[:] = values
    return arr


def write_origins(group: zarr.Group, origins) -> None:
    """Patch origins (patch, axis) with the axis labels, the coordinate every per-patch store carries."""
    origins = np.asarray(origins, dtype=np.int32)
    n = len(origins)
    create_array(group, "origin", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int32", dims=("patch", "axis"))[:] = (
        origins
    )
    write_strings(group, "axis", ["array_row", "array_col"], "axis")


def consolidate(path: Path) -> None:
    """Consolidate a store's metadata so xarray opens it with one read (zarr-python's v3 extension)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(zarr.storage.LocalStore(path))


def open_local(path: Path, mode: str = "r") -> zarr.Group:
    """A Zarr v3 group on the local disk."""
    return zarr.open_group(zarr.storage.LocalStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)


def chunk_keys(arr: zarr.Array) -> list[str]:
    """Every chunk key of an array (``c/0/0/...``), in C order of the chunk grid."""
    return [arr.metadata.encode_chunk_key(idx) for idx in np.ndindex(*arr.cdata_shape)]


def missing_chunks(arr: zarr.Array, array_dir: Path) -> list[str]:
    """Chunk keys of a fully written local array whose files are absent (zarr would read them as fill)."""
    return [k for k in chunk_keys(arr) if not (Path(array_dir) / k).is_file()]


def read_error(arr: zarr.Array, label: str, idx, exc: Exception, fix: str):
    """One clear error for a failed read of patches ``idx``: which chunk(s) of which array, and what to do."""
    from featcache.errors import FeatcacheError

    k = arr.chunks[0]
    bad = []
    for c in sorted({int(i) // k for i in np.atleast_1d(idx)}):
        try:
            arr[c * k : min((c + 1) * k, arr.shape[0])]
        except Exception:  # noqa: BLE001 - the same failure, located
            bad.append(c)
    where = ", ".join(f"chunk {c} (patches {c * k}-{min((c + 1) * k, arr.shape[0]) - 1})" for c in bad) or "a chunk"
    return FeatcacheError(f"{label}: {where} cannot be read ({type(exc).__name__}: {str(exc)[:90]}); {fix}")
