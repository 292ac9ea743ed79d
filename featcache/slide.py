"""Lazy access to the full-resolution H&E and rendering of bin-aligned patches (DESIGN §2).

The image can be 70k × 60k px, so it is never loaded whole: regions are read through tifffile's
Zarr interface, which decodes only the tiles (or strips) a region touches, and a pyramid level is
used when one is close to the target scale.

A patch is rendered by resampling the image on the bin lattice: output pixel (y, x) of a patch
whose bin (0, 0) is array (r0, c0) sits at array coordinate ``r0 + (y + 0.5)/p - 0.5`` (p = pixels
per bin), which the sample's affine map sends to full-resolution pixels. So token (i, j) of a ViT
with patch size p covers exactly bin (r0 + i, c0 + j), whatever the grid's rotation or flips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr
from scipy import ndimage

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, PatchGeometry

WHITE = 255


def _downsample(base: int, size: int) -> float:
    """A level made by integer binning (size == base // k) has downsample exactly k."""
    k = round(base / size)
    return float(k) if k >= 1 and base // k == size else base / size


class Slide:
    """A (possibly pyramidal, tiled or striped, Big)TIFF RGB image read region by region."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as exc:  # tifffile raises several types for non-TIFF input
            raise FeatcacheError(f"cannot read {self.path} as a TIFF image ({exc}).") from exc
        self.levels: list[zarr.Array] = []
        self.downsample: list[tuple[float, float]] = []
        base = None
        for i, level in enumerate(series.levels):
            axes = level.axes
            if axes not in ("YXS", "YX") or (axes == "YXS" and level.shape[2] not in (3, 4)):
                raise FeatcacheError(
                    f"{self.path}: level {i} has axes {axes} and shape {level.shape}; an RGB H&E image "
                    "(height × width × 3) is needed."
                )
            if axes == "YX":
                raise FeatcacheError(f"{self.path} is a single-channel image; an RGB H&E image is needed.")
            arr = zarr.open(series.aszarr(level=i), mode="r")
            if base is None:
                base = arr.shape
            self.levels.append(arr)
            self.downsample.append(tuple(_downsample(b, n) for b, n in zip(base[:2], arr.shape[:2])))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[:2])

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def choose_level(self, scale: float) -> int:
        """The coarsest level whose downsample does not exceed ``scale`` (full-res px per output px)."""
        usable = [i for i, d in enumerate(self.downsample) if max(d) <= scale * 1.001] or [0]
        return max(usable, key=lambda i: max(self.downsample[i]))

    def read(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Pixels [r0:r1, c0:c1] of a level as uint8 RGB; outside the image is white."""
        arr = self.levels[level]
        h, w = arr.shape[:2]
        out = np.full((r1 - r0, c1 - c0, 3), WHITE, dtype=np.uint8)
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if rr0 < rr1 and cc0 < cc1:
            out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = arr[rr0:rr1, cc0:cc1, :3]
        return out


def patch_to_fullres(affine_matrix: np.ndarray, r0: int, c0: int, geom: PatchGeometry = GEOMETRY) -> np.ndarray:
    """2×3 matrix sending output pixel (y, x, 1) of patch (r0, c0) to full-res (row, col)."""
    a2, t = affine_matrix[:, :2], affine_matrix[:, 2]
    p = geom.px_per_bin
    base = np.array([r0 + 0.5 / p - 0.5, c0 + 0.5 / p - 0.5])
    return np.column_stack([a2 / p, a2 @ base + t])


def render_patch(
    slide: Slide, affine_matrix: np.ndarray, r0: int, c0: int, geom: PatchGeometry = GEOMETRY
) -> np.ndarray:
    """Resample the H&E on the bin lattice of patch (r0, c0): uint8 (patch_px, patch_px, 3)."""
    full = patch_to_fullres(affine_matrix, r0, c0, geom)
    scale = float(np.sqrt(abs(np.linalg.det(full[:, :2]))))  # full-res px per output px
    level = slide.choose_level(scale)
    dr, dc = slide.downsample[level]
    # Level pixel centres: level = (full + 0.5) / d - 0.5.
    to_level = np.diag([1 / dr, 1 / dc])
    mat = to_level @ full[:, :2]
    off = to_level @ (full[:, 2] + 0.5) - 0.5
    residual = scale / np.sqrt(dr * dc)
    sigma = max(0.0, (residual - 1.0) / 2.0)  # anti-aliasing, as skimage.transform.rescale does

    n = geom.patch_px
    corners = np.array([[-0.5, -0.5], [-0.5, n - 0.5], [n - 0.5, -0.5], [n - 0.5, n - 0.5]])
    mapped = corners @ mat.T + off
    margin = int(np.ceil(3 * sigma)) + 2
    lo = np.floor(mapped.min(axis=0)).astype(int) - margin
    hi = np.ceil(mapped.max(axis=0)).astype(int) + margin + 1
    region = slide.read(level, lo[0], hi[0], lo[1], hi[1]).astype(np.float32)
    if sigma > 0.05:
        region = ndimage.gaussian_filter(region, sigma=(sigma, sigma, 0), mode="nearest")
    matrix3 = np.eye(3)
    matrix3[:2, :2] = mat
    offset3 = np.array([off[0] - lo[0], off[1] - lo[1], 0.0])
    out = ndimage.affine_transform(
        region, matrix3, offset=offset3, output_shape=(n, n, 3), order=1, mode="constant", cval=WHITE
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
