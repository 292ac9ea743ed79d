"""Patch geometry (docs/design.md §2): the one place that knows 32 bins × 14 px = 448 px and 8 µm bins.

A patch is 32 × 32 bins of 8 µm rendered at 448 × 448 px, 14 px per bin, so a patch-14 ViT's
32 × 32 token grid sits exactly on the bins: token (i, j) is bin (r0 + i, c0 + j). Encoders with
16 px patches (or a stride-16 CNN grid) read the same patches rendered at 16 px per bin, 512 × 512
px (``PatchGeometry(px_per_bin=16)``), so that their token (i, j) is bin (r0 + i, c0 + j) too. Each
rendering is its own array of the dataset (:func:`image_array_name`), resampled from the
full-resolution slide through the same bin map, never resized from another rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError

BIN_UM = 8.0  # Visium HD's 8 µm bins


@dataclass(frozen=True)
class PatchGeometry:
    """32 × 32 bins of 8 µm per patch at ``px_per_bin`` px per bin: 14 (448 px, one ViT-14 token per bin) by
    default; ``PatchGeometry(px_per_bin=16)`` is the 16 px rendering (512 px, 0.5 µm/px, one ViT-16 token per bin)."""

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
# The renderings a dataset can hold, by pixels per bin: 14 (``image``, always) and 16 (``image_16px``).
RENDERINGS = (14, 16)


def geometry_for(px_per_bin: int) -> PatchGeometry:
    """The patch geometry of one rendering: 32 × 32 bins at ``px_per_bin`` px per bin."""
    if px_per_bin not in RENDERINGS:
        raise FeatcacheError(
            f"{px_per_bin} px per bin: featcache renders patches at {' or '.join(map(str, RENDERINGS))} px per bin."
        )
    return PatchGeometry(px_per_bin=px_per_bin)


def image_array_name(px_per_bin: int) -> str:
    """The patches.zarr array of a rendering: ``image`` at 14 px per bin, ``image_<p>px`` at any other."""
    return "image" if px_per_bin == GEOMETRY.px_per_bin else f"image_{px_per_bin}px"


def parse_renderings(text: str | int | list | tuple) -> tuple[int, ...]:
    """``"14,16"`` (or ``"16"``, ``[16]``) -> (14, 16): the renderings asked for, 14 always among them (the
    dataset's ``image``, which every other reader of patches uses), sorted."""
    items = str(text).replace(" ", "").split(",") if isinstance(text, (str, int)) else [str(v) for v in text]
    try:
        values = {int(v) for v in items if v}
    except ValueError:
        raise FeatcacheError(f"--px-per-bin {text!r}: expected pixels per bin, e.g. --px-per-bin 14,16") from None
    for v in values:
        geometry_for(v)
    return tuple(sorted(values | {GEOMETRY.px_per_bin}))


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


def first_cover(origins: np.ndarray, bins: int = GEOMETRY.bins) -> np.ndarray:
    """(n, bins, bins) bool: True where a patch holds a section bin for the first time in patch order.

    At a stride below the patch side, patches overlap and a bin sits in several of them; statistics over
    "every bin" (the target transform's mean and std) count each bin once with this mask.
    """
    origins = np.asarray(origins, np.int64).reshape(-1, 2)
    out = np.zeros((len(origins), bins, bins), bool)
    if not len(origins):
        return out
    seen = np.zeros(tuple(origins.max(axis=0) + bins), bool)
    for k, (r, c) in enumerate(origins):
        window = seen[r : r + bins, c : c + bins]
        out[k] = ~window
        window[:] = True
    return out


class BinSums:
    """Per-patch maps summed bin by bin on one section's grid: the one per-bin average of overlapping patches.

    Patch (r0, c0)'s bin (i, j) is array bin (r0 + i, c0 + j) (docs/design.md §2); where patches overlap
    (stride < 32 bins) a bin's value is the mean over the patches holding it. Scoring, stitched maps, the
    exported AnnData and ``featcache predict``'s .h5ad all take their averages from here, in float64 and
    added in patch order, so metrics and maps agree to the last bit.

    ``maps`` (patch, ..., bins, bins) of one section; ``keep`` (patch, bins, bins), optional, marks the bins
    that take part (the others count as absent from that patch).
    """

    def __init__(self, origins: np.ndarray, maps: np.ndarray, keep: np.ndarray | None = None):
        origins = np.asarray(origins, np.int64).reshape(-1, 2)
        self.bins = b = maps.shape[-1]
        self.top_left = origins.min(axis=0) if len(origins) else np.zeros(2, np.int64)
        self.local = origins - self.top_left
        shape = tuple(self.local.max(axis=0) + b) if len(origins) else (0, 0)
        self.count = np.zeros(shape, np.int64)
        self.total = np.zeros((*maps.shape[1:-2], *shape), np.float64)
        for j, window in enumerate(self._windows()):
            if keep is None:
                self.total[(..., *window)] += maps[j]
                self.count[window] += 1
            else:
                self.total[(..., *window)] += np.where(keep[j], maps[j], 0)
                self.count[window] += keep[j]

    def _windows(self):
        b = self.bins
        for r, c in self.local:
            yield slice(r, r + b), slice(c, c + b)

    def grid(self) -> np.ndarray:
        """(..., rows, cols) float64 means over the bounding box from :attr:`top_left`; NaN where no patch lies."""
        with np.errstate(invalid="ignore"):  # 0 / 0 where no patch lies
            return self.total / self.count

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """One row per bin held: (array coordinates (n, 2) sorted by (row, col), means (n, ...))."""
        rows, cols = np.nonzero(self.count)
        means = self.total[..., rows, cols] / self.count[rows, cols]
        return np.column_stack([rows, cols]) + self.top_left, np.moveaxis(means, -1, 0)

    def patch_maps(self, dtype=np.float64) -> np.ndarray:
        """(patch, ..., bins, bins): each patch's window of the averaged grid (:meth:`grid`), as ``dtype``."""
        out = np.empty((len(self.local), *self.total.shape[:-2], self.bins, self.bins), dtype)
        with np.errstate(invalid="ignore"):
            for j, window in enumerate(self._windows()):
                out[j] = self.total[(..., *window)] / self.count[window]
        return out

    def first(self) -> np.ndarray:
        """(patch, bins, bins) bool: the bins each patch is the first (in patch order) to cover."""
        return first_cover(self.local, self.bins)


def bin_table(origins: np.ndarray, values: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch maps as one row per distinct bin, the bins ``mask`` marks: :meth:`BinSums.table`."""
    return BinSums(origins, values, mask).table()


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
