"""The map from the 8 µm bin lattice to full-resolution image pixels (docs/design.md §2).

Space Ranger registers the slide to the microscope image through a homography, so bin centres
(``pxl_row_in_fullres``, ``pxl_col_in_fullres``) are a projective function of (``array_row``,
``array_col``), not an affine one. :func:`register` fits the 8-parameter projective transform to
every bin of a sample; when even that leaves more than :data:`MAX_RESIDUAL_BINS` somewhere (a
registration that is only locally projective), each patch gets its own homography fitted to its
own bins, and a patch whose bins no homography follows to that tolerance is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY

MAX_RESIDUAL_BINS = 0.02  # worst bin's distance from the map actually used, in bins
FIT_SAMPLE = 50_000  # bins used to fit a sample-wide map (the residual is computed over all of them)


@dataclass(frozen=True)
class BinMap:
    """(array_row, array_col) → (pxl_row, pxl_col): a 3 × 3 projective matrix (affine when its last row is 0 0 1)."""

    matrix: np.ndarray

    def to_pixels(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        m = self.matrix
        w = m[2, 0] * rows + m[2, 1] * cols + m[2, 2]
        return (m[0, 0] * rows + m[0, 1] * cols + m[0, 2]) / w, (m[1, 0] * rows + m[1, 1] * cols + m[1, 2]) / w

    def matrix_inverse(self) -> BinMap:
        """The inverse map, (pxl_row, pxl_col) → (array_row, array_col), as a BinMap."""
        m = np.linalg.inv(self.matrix)
        return BinMap(m / m[2, 2])

    def jacobian(self, row: float, col: float) -> np.ndarray:
        """d(pxl_row, pxl_col) / d(array_row, array_col) at one point (2 × 2)."""
        m = self.matrix
        w = m[2, 0] * row + m[2, 1] * col + m[2, 2]
        pr, pc = self.to_pixels(row, col)
        return (
            np.array(
                [[m[0, 0] - pr * m[2, 0], m[0, 1] - pr * m[2, 1]], [m[1, 0] - pc * m[2, 0], m[1, 1] - pc * m[2, 1]]]
            )
            / w
        )

    def px_per_bin(self, row: float, col: float) -> float:
        """Local lattice spacing in full-resolution pixels (geometric mean of the two axes)."""
        return float(np.sqrt(abs(np.linalg.det(self.jacobian(row, col)))))

    def describe(self, row: float, col: float) -> dict:
        """Spacing, rotation and flip at one point; the perspective terms of the matrix."""
        j = self.jacobian(row, col)
        flipped = bool(np.linalg.det(j) < 0)
        return {
            "px_per_bin": self.px_per_bin(row, col),
            "rotation_deg": float(np.degrees(np.arctan2(j[1, 0], j[0, 0]))),
            "flipped": flipped,
            "perspective": [float(self.matrix[2, 0]), float(self.matrix[2, 1])],
        }


def _normalise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hartley's conditioning: centroid to the origin, mean distance √2."""
    cx, cy = x.mean(), y.mean()
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2).mean() or 1.0
    s = np.sqrt(2) / d
    return np.array([[s, 0, -s * cx], [0, s, -s * cy], [0, 0, 1.0]])


def fit_homography(ar, ac, pr, pc) -> BinMap:
    """The projective map that best fits the points (normalised direct linear transform)."""
    ar, ac, pr, pc = (np.asarray(v, dtype=np.float64) for v in (ar, ac, pr, pc))
    ta, tp = _normalise(ar, ac), _normalise(pr, pc)
    a = ta @ np.vstack([ar, ac, np.ones_like(ar)])
    p = tp @ np.vstack([pr, pc, np.ones_like(pr)])
    n = a.shape[1]
    rows = np.zeros((2 * n, 9))
    rows[0::2, 0:3] = a.T
    rows[0::2, 6:9] = -p[0][:, None] * a.T
    rows[1::2, 3:6] = a.T
    rows[1::2, 6:9] = -p[1][:, None] * a.T
    h = np.linalg.svd(rows, full_matrices=False)[2][-1].reshape(3, 3)
    m = np.linalg.inv(tp) @ h @ ta
    return BinMap(m / m[2, 2])


def fit_affine(ar, ac, pr, pc) -> BinMap:
    design = np.column_stack([np.asarray(ar, float), np.asarray(ac, float), np.ones(len(ar))])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([np.asarray(pr, float), np.asarray(pc, float)]), rcond=None)
    return BinMap(np.vstack([coef.T, [0.0, 0.0, 1.0]]))


def residual_px(m: BinMap, ar, ac, pr, pc) -> np.ndarray:
    r, c = m.to_pixels(ar, ac)
    return np.hypot(r - np.asarray(pr, float), c - np.asarray(pc, float))


@dataclass
class Registration:
    """The map each patch is rendered through: one sample-wide homography, or one per patch."""

    sample: str
    global_map: BinMap
    centre: tuple[float, float]  # (array_row, array_col) at the middle of the tissue
    affine_residual_bins: float
    global_residual_bins: float
    positions: tuple[np.ndarray, ...] = field(repr=False)  # array_row, array_col, pxl_row, pxl_col of every bin
    patch_maps: dict[tuple[int, int], BinMap] = field(default_factory=dict)
    patch_residual_bins: float = 0.0

    @property
    def px_per_bin(self) -> float:
        return self.global_map.px_per_bin(*self.centre)

    @property
    def local(self) -> bool:
        return self.global_residual_bins > MAX_RESIDUAL_BINS

    def map_for(self, r0: int, c0: int) -> BinMap:
        return self.patch_maps.get((int(r0), int(c0)), self.global_map)

    def fit_patches(self, origins: np.ndarray, grid_shape: tuple[int, int], bins: int = GEOMETRY.bins) -> None:
        """When the sample-wide homography is not enough: one homography per patch, fitted to its own bins."""
        if not self.local:
            return
        ar, ac, pr, pc = self.positions
        index = np.full(grid_shape, -1, np.int64)
        index[ar.astype(int), ac.astype(int)] = np.arange(len(ar))
        worst = 0.0
        for r0, c0 in origins:
            idx = index[max(r0 - 1, 0) : r0 + bins + 1, max(c0 - 1, 0) : c0 + bins + 1].ravel()
            idx = idx[idx >= 0]
            m = fit_homography(ar[idx], ac[idx], pr[idx], pc[idx])
            res = residual_px(m, ar[idx], ac[idx], pr[idx], pc[idx]).max() / m.px_per_bin(r0 + bins / 2, c0 + bins / 2)
            if res > MAX_RESIDUAL_BINS:
                raise FeatcacheError(
                    f"sample {self.sample}: the bins of the patch at array ({r0}, {c0}) follow no projective map "
                    f"(worst bin {res:.2f} bins off the best local fit, limit {MAX_RESIDUAL_BINS}); the positions "
                    "file is damaged or the registration failed. Check it in Space Ranger's QC, or re-run it."
                )
            self.patch_maps[(int(r0), int(c0))] = m
            worst = max(worst, float(res))
        self.patch_residual_bins = worst

    def to_json(self) -> dict:
        used = self.patch_residual_bins if self.local else self.global_residual_bins
        return {
            "map": "per-patch homography" if self.local else "sample-wide homography",
            "global_homography": self.global_map.matrix.tolist(),
            "global_affine_residual_bins": self.affine_residual_bins,
            "global_homography_residual_bins": self.global_residual_bins,
            "residual_bins_of_map_used": used,
            **self.global_map.describe(*self.centre),
        }


def register(sample: str, ar, ac, pr, pc, in_tissue) -> Registration:
    """Fit the sample-wide homography (and, for the record, the affine map) to every bin's position."""
    ar, ac, pr, pc = (np.asarray(v, dtype=np.float64) for v in (ar, ac, pr, pc))
    step = max(1, len(ar) // FIT_SAMPLE)
    fit = slice(None, None, step)
    tissue = np.asarray(in_tissue, bool)
    centre = (float(np.median(ar[tissue])), float(np.median(ac[tissue]))) if tissue.any() else (ar.mean(), ac.mean())
    hom = fit_homography(ar[fit], ac[fit], pr[fit], pc[fit])
    aff = fit_affine(ar[fit], ac[fit], pr[fit], pc[fit])
    pitch = hom.px_per_bin(*centre)
    if not np.isfinite(pitch) or pitch <= 0:
        raise FeatcacheError(
            f"sample {sample}: the bin positions do not form a lattice (all on one line?); the "
            "positions file is damaged."
        )
    return Registration(
        sample=sample,
        global_map=hom,
        centre=centre,
        positions=(ar, ac, pr, pc),
        affine_residual_bins=float(residual_px(aff, ar, ac, pr, pc).max() / pitch),
        global_residual_bins=float(residual_px(hom, ar, ac, pr, pc).max() / pitch),
    )
