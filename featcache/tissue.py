"""Where the tissue is on a slide that has no Visium positions: a thumbnail, a tissue mask, bins in tissue.

The thumbnail is read level by level and band by band (never the whole full-resolution image). A
pixel is tissue when its saturation passes Otsu's threshold (computed on the slide itself) and
it is neither glass, nor a black border or dust (too dark), nor pen ink (saturated blue or green:
H&E stains are pink and purple); the mask is then cleaned morphologically and its holes (gland
lumens, which Visium counts as tissue) filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from featcache.errors import FeatcacheError
from featcache.slide import Slide

BAND_ROWS = 256  # full-resolution rows read at a time when a slide has no small pyramid level


def thumbnail(slide: Slide, downsample: float) -> tuple[np.ndarray, float]:
    """An RGB thumbnail about ``downsample``× smaller than the full image, and its exact scale (thumb / full)."""
    usable = [i for i, d in enumerate(slide.downsample) if max(d) <= downsample * 1.001] or [0]
    level = max(usable, key=lambda i: max(slide.downsample[i]))
    d = max(slide.downsample[level])
    k = max(1, int(downsample / d))  # further integer binning of that level
    h, w = slide.levels[level].shape[:2]
    h_out, w_out = h // k, w // k
    if h_out == 0 or w_out == 0:
        raise FeatcacheError(f"{slide.path} is too small to find tissue on ({h} × {w} px).")
    out = np.empty((h_out, w_out, 3), np.uint8)
    band = max(k, (BAND_ROWS // k) * k)
    for r0 in range(0, h_out * k, band):
        rows = min(band, h_out * k - r0)
        block = slide.read(level, r0, r0 + rows, 0, w_out * k).astype(np.float32)
        out[r0 // k : (r0 + rows) // k] = np.rint(block.reshape(rows // k, k, w_out, k, 3).mean(axis=(1, 3)))
    return out, 1.0 / (d * k)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail (glass, black borders, dust and pen marks excluded)."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    # HSV's value and saturation straight from the channels' max and min, in float32, and hue only where
    # it matters (saturated pixels): scikit-image's rgb2hsv of a whole thumbnail takes ~100 bytes a pixel
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    dark = top < 0.2 * 255  # black borders, dust, folds of ink
    sat = np.zeros(top.shape, np.float32)
    np.divide(top - bottom.astype(np.float32), top, out=sat, where=top > 0)
    pen = sat > 0.25
    hue = rgb2hsv(rgb[pen][:, None, :])[:, 0, 0] * 360
    pen[pen] = (hue > 90) & (hue < 250)  # blue and green ink; H&E is pink to purple
    candidates = sat[~dark & ~pen]
    if candidates.size == 0 or np.ptp(candidates) < 0.02:
        return np.zeros(rgb.shape[:2], bool)
    threshold = max(float(threshold_otsu(candidates)), 0.05)  # never call faint glass tissue
    mask = (sat > threshold) & ~dark & ~pen
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)  # gland lumens and pale holes inside a section are tissue bins too
    mask = ndimage.binary_dilation(mask, iterations=1)  # the pale rim of a section (its bins hold RNA too)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= max(16, 0.001 * mask.size)))
    return mask


def bins_in_tissue(mask: np.ndarray, scale: float, pitch_px: float, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) of axis-aligned bins of ``pitch_px`` full-resolution px: in tissue when ≥ half their area is."""
    cell = pitch_px * scale  # thumbnail pixels per bin
    r_edges = np.clip(np.rint(np.arange(rows + 1) * cell).astype(int), 0, mask.shape[0])
    c_edges = np.clip(np.rint(np.arange(cols + 1) * cell).astype(int), 0, mask.shape[1])
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    r0, r1 = r_edges[:-1, None], r_edges[1:, None]
    c0, c1 = c_edges[None, :-1], c_edges[None, 1:]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return inside / area >= 0.5


# --------------------------------------------------------------------------- do positions belong to an image?
MIN_IMAGE_NCC = 0.5
"""The lowest :func:`image_agreement` of a slide's own Space Ranger output. A registered image of the same slide
scores ≈ 1 whatever its brightness, contrast, gamma or stain balance (the score is a correlation of grey levels),
with noise or JPEG-like blur (≥ 0.98 on the synthetic slides) and stays ≥ 0.85 up to one bin of misalignment; another
slide's texture does not line up with this one's, and only the shared outline of tissue against glass correlates
(≤ 0.3 on pairs of synthetic sections cut to the same shape). Halfway between leaves both sides a wide margin."""
IMAGE_CELL_BINS = 2.0  # the comparison grid's cell, in 8 µm bins: coarse enough to forgive a bin of misalignment
HIGHPASS_CELLS = 2.0  # σ of the blur subtracted from both images: what is left is texture, not the tissue's outline


def grey(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) of an RGB image, float32."""
    return np.asarray(rgb, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def _on_grid(image: np.ndarray, scale: float, rows: np.ndarray, cols: np.ndarray, cell: float) -> np.ndarray:
    """``image`` (``scale``× the full image) averaged over cells of ``cell`` full-resolution px, sampled at the
    full-resolution points ``rows`` × ``cols``."""
    f = cell * scale  # image px per cell
    smooth = ndimage.gaussian_filter(image, f / 2) if f > 1 else image
    rr, cc = np.meshgrid(rows * scale - 0.5, cols * scale - 0.5, indexing="ij")
    return ndimage.map_coordinates(smooth, [rr, cc], order=1, mode="nearest")


def image_agreement(
    thumb: np.ndarray, scale: float, registered: np.ndarray, registered_scale: float, pitch_px: float, extent
) -> float:
    """Normalised cross-correlation of the grey texture of two images of full-resolution frames: a thumbnail
    ``scale``× the slide, and the image Space Ranger registered the bins to (``tissue_lowres/hires_image.png``,
    ``registered_scale``× it), both averaged on a grid of :data:`IMAGE_CELL_BINS` bins (or the coarser image's
    pixel) over ``extent`` = (row0, row1, col0, col1) full-resolution px, their slow variations removed."""
    cell = max(IMAGE_CELL_BINS * pitch_px, 1 / scale, 1 / registered_scale)
    r0, r1, c0, c1 = extent
    rows = r0 + (np.arange(max(1, int((r1 - r0) // cell))) + 0.5) * cell
    cols = c0 + (np.arange(max(1, int((c1 - c0) // cell))) + 0.5) * cell
    a, b = (_on_grid(grey(im), s, rows, cols, cell) for im, s in ((thumb, scale), (registered, registered_scale)))
    a, b = (x - ndimage.gaussian_filter(x, HIGHPASS_CELLS) for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


MIN_AGREEMENT = 0.7  # the lowest (in-tissue bins on tissue) − (other bins on tissue) of a slide's own positions


def positions_agreement(mask: np.ndarray, scale: float, pxl_row, pxl_col, in_tissue) -> tuple[float, float]:
    """(fraction of the in-tissue bins, fraction of the other bins) whose centres fall on the tissue ``mask`` of a
    thumbnail ``scale``× the full image: a slide's own Space Ranger positions have most of the first and little of
    the second; another slide's positions do not (their difference falls far below :data:`MIN_AGREEMENT`)."""
    r = np.clip(np.rint(np.asarray(pxl_row) * scale).astype(int), 0, mask.shape[0] - 1)
    c = np.clip(np.rint(np.asarray(pxl_col) * scale).astype(int), 0, mask.shape[1] - 1)
    on, t = mask[r, c], np.asarray(in_tissue, bool)
    return float(on[t].mean()) if t.any() else 0.0, float(on[~t].mean()) if (~t).any() else 0.0
