"""Patch geometry (docs/design.md §2): the one place that knows 32 bins × 14 px = 448 px and 8 µm bins.

A patch is 32 × 32 bins of 8 µm rendered at 448 × 448 px, 14 px per bin, so a patch-14 ViT's
32 × 32 token grid sits exactly on the bins: token (i, j) is bin (r0 + i, c0 + j).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIN_UM = 8.0  # Visium HD's 8 µm bins


@dataclass(frozen=True)
class PatchGeometry:
    """32 × 32 bins of 8 µm per patch, 14 px per bin: 448 px, one ViT-14 token per bin."""

    bins: int = 32
    px_per_bin: int = 14
    bin_um: float = BIN_UM

    @property
    def patch_px(self) -> int:
        return self.bins * self.px_per_bin

    @property
    def um_per_px(self) -> float:
        return self.bin_um / self.px_per_bin

    def to_json(self) -> dict:
        return {
            "bins_per_patch": self.bins,
            "px_per_bin": self.px_per_bin,
            "patch_px": self.patch_px,
            "bin_um": self.bin_um,
        }


GEOMETRY = PatchGeometry()


def patch_origins(in_tissue: np.ndarray, stride: int, min_tissue: float, bins: int = GEOMETRY.bins) -> np.ndarray:
    """Origins (row, col) every ``stride`` bins whose bins×bins window is in tissue by ≥ ``min_tissue``."""
    rows, cols = in_tissue.shape
    integral = np.zeros((rows + 1, cols + 1), np.int64)
    integral[1:, 1:] = in_tissue.astype(np.int64).cumsum(0).cumsum(1)
    r0 = np.arange(0, rows - bins + 1, stride)
    c0 = np.arange(0, cols - bins + 1, stride)
    rr, cc = np.meshgrid(r0, c0, indexing="ij")
    inside = integral[rr + bins, cc + bins] - integral[rr, cc + bins] - integral[rr + bins, cc] + integral[rr, cc]
    keep = inside >= min_tissue * bins * bins - 1e-9
    return np.column_stack([rr[keep], cc[keep]]).astype(np.int32)


def gather_windows(grid: np.ndarray, origins: np.ndarray, bins: int = GEOMETRY.bins) -> np.ndarray:
    """(n, bins, bins) slices of a per-bin grid at each patch origin (row, col)."""
    if len(origins) == 0:
        return np.zeros((0, bins, bins), grid.dtype)
    return np.stack([grid[r : r + bins, c : c + bins] for r, c in origins])


def bin_table(origins: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch maps as one row per distinct bin: averaged where patches overlap (stride < 32).

    ``values`` (patch, ..., bins, bins), ``mask`` (patch, bins, bins) marks the bins to keep.
    Returns (array coordinates (n, 2), values (n, ...)) sorted by (row, col).
    """
    p, i, j = np.nonzero(mask)
    coords = np.asarray(origins, dtype=np.int64)[p] + np.column_stack([i, j])
    rows = np.moveaxis(values, (-2, -1), (1, 2))[p, i, j].astype(np.float64)  # (m, ...)
    unique, inverse, count = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
    total = np.zeros((len(unique), *rows.shape[1:]))
    np.add.at(total, inverse.ravel(), rows)
    return unique, total / count.reshape(-1, *([1] * (rows.ndim - 1)))


def covering_origins(
    in_tissue: np.ndarray, stride: int, min_tissue: float, bins: int = GEOMETRY.bins
) -> tuple[np.ndarray, np.ndarray]:
    """Window origins on a ``stride`` lattice anchored at the tissue's bounding box, reaching past the grid's
    edges where the tissue does (so no tissue is left out); returns (origins, the grid padded to hold them)."""
    rows, cols = np.nonzero(in_tissue)
    if len(rows) == 0:
        return np.zeros((0, 2), np.int32), in_tissue
    r_start, c_start = rows.min() % stride, cols.min() % stride  # on the lattice through the top-left tissue bin
    r_start = rows.min() - ((rows.min() - r_start) % stride)
    c_start = cols.min() - ((cols.min() - c_start) % stride)
    height = max(in_tissue.shape[0], r_start + ((rows.max() - r_start) // stride) * stride + bins)
    width = max(in_tissue.shape[1], c_start + ((cols.max() - c_start) // stride) * stride + bins)
    padded = np.zeros((height, width), bool)
    padded[: in_tissue.shape[0], : in_tissue.shape[1]] = in_tissue
    shifted = patch_origins(padded[r_start:, c_start:], stride, min_tissue, bins)
    return (shifted + np.array([r_start, c_start], np.int32)).astype(np.int32), padded
