"""The QC picture ``prepare`` writes per sample: the slide, its in-tissue bins and the kept patches' outlines.

Everything on it goes through the registration the patches were rendered with: every in-tissue
bin's area through the sample-wide map, each patch's outline (the outer edge of its 32 × 32
bins) through the very map :func:`featcache.slide.render_patch` used for that patch. A wrong
µm/px shows as outlines that drift off the tissue; a flipped grid as bins tinted on glass.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from featcache.geometry import GEOMETRY
from featcache.slide import Slide
from featcache.tissue import thumbnail

MAX_SIDE = 1000  # thumbnail pixels along the slide's longer side, at most (a PNG of about a megabyte)
OUTLINE = (0, 255, 255)  # cyan: no H&E stain is this colour
BIN_TINT = (0, 160, 60)  # green, blended lightly over the in-tissue bins ...
BIN_EDGE = (0, 110, 40)  # ... whose outer edge is drawn in full
TINT_ALPHA = 0.15


def patch_corners(bin_map, r0: int, c0: int, bins: int = GEOMETRY.bins) -> np.ndarray:
    """Full-resolution (row, col) of the patch's four outer corners: the edges of its corner bins."""
    lo, hi = -0.5, bins - 0.5
    rows = np.array([r0 + lo, r0 + lo, r0 + hi, r0 + hi])
    cols = np.array([c0 + lo, c0 + hi, c0 + hi, c0 + lo])
    pr, pc = bin_map.to_pixels(rows, cols)
    return np.stack([pr, pc], axis=1)


def qc_picture(
    image_path, registration, in_tissue: np.ndarray, origins: np.ndarray, title: str = ""
) -> tuple[np.ndarray, float]:
    """RGB thumbnail with in-tissue bins tinted and patch outlines drawn; and its scale (thumbnail px / full px)."""
    with Slide(image_path) as slide:
        h, w = slide.levels[0].shape[:2]
        thumb, scale = thumbnail(slide, max(1.0, max(h, w) / MAX_SIDE))
    j = -(-max(thumb.shape[:2]) // MAX_SIDE)  # the pyramid's levels may leave it larger: bin it further, exactly
    if j > 1:
        rows, cols = thumb.shape[0] // j, thumb.shape[1] // j
        block = thumb[: rows * j, : cols * j].astype(np.float32).reshape(rows, j, cols, j, 3).mean(axis=(1, 3))
        thumb, scale = np.rint(block).astype(np.uint8), scale / j
    out = thumb.astype(np.float32)
    # every thumbnail pixel back through the inverse map onto the bin lattice: tinted where that bin is in tissue
    inverse = registration.global_map.matrix_inverse()
    y, x = np.mgrid[0 : out.shape[0], 0 : out.shape[1]].astype(np.float64)
    ar, ac = inverse.to_pixels((y + 0.5) / scale - 0.5, (x + 0.5) / scale - 0.5)
    ar, ac = np.rint(ar).astype(np.int64), np.rint(ac).astype(np.int64)
    inside = (ar >= 0) & (ar < in_tissue.shape[0]) & (ac >= 0) & (ac < in_tissue.shape[1])
    hit = np.zeros(out.shape[:2], bool)
    hit[inside] = in_tissue[ar[inside], ac[inside]]
    out[hit] = (1 - TINT_ALPHA) * out[hit] + TINT_ALPHA * np.array(BIN_TINT, np.float32)
    edge = hit & ~ndimage.binary_erosion(hit, iterations=max(1, round(min(out.shape[:2]) / 600)))
    out[edge] = BIN_EDGE
    picture = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(picture.size) / 600))
    for r0, c0 in origins:
        corners = (patch_corners(registration.map_for(int(r0), int(c0)), int(r0), int(c0)) + 0.5) * scale - 0.5
        points = [(float(c), float(r)) for r, c in corners]
        draw.line(points + points[:1], fill=OUTLINE, width=width)
    if title:
        caption = f"{title}: in-tissue bins (green edge), {len(origins)} kept patches (cyan)"
        draw.text((6, 4), caption, fill=(40, 40, 40), font_size=max(10, round(min(picture.size) / 50)))
    return np.asarray(picture), float(scale)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
