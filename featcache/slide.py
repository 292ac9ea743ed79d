"""Lazy access to the full-resolution H&E and rendering of bin-aligned patches (docs/design.md §2).

The image can be 70k × 60k px, so a TIFF is never loaded whole: regions are read through
tifffile's Zarr interface, which decodes only the tiles (or strips) a region touches, for every
layout tifffile reads (tiled, striped, pyramidal, BigTIFF, OME-TIFF, SVS) and every compression
``imagecodecs`` decodes. A plain JPEG or PNG microscope image is read once, whole. One region of
every level is decoded when the slide is opened, so a missing codec or a truncated file fails
there, with one message, before anything is written.

A patch is rendered by resampling the image on the bin lattice: output pixel (y, x) of a patch
whose bin (0, 0) is array (r0, c0) sits at array coordinate ``r0 + (y + 0.5)/p - 0.5`` (p = pixels
per bin), which the sample's bin map (a homography, featcache/registration.py) sends to
full-resolution pixels. So token (i, j) of a ViT with patch size p covers exactly bin
(r0 + i, c0 + j), whatever the grid's rotation, flips or perspective.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import tifffile
import zarr
from scipy import ndimage

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, PatchGeometry

WHITE = 255
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")
PIL_PIXEL_LIMIT = 4_000_000_000  # Pillow's decompression-bomb guard, raised deliberately for whole-slide images


def _downsample(base: int, size: int) -> float:
    """A level made by integer binning (size == base // k) has downsample exactly k."""
    k = round(base / size)
    return float(k) if k >= 1 and base // k == size else base / size


def _decode_hint(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, MemoryError):
        return "decoding it needs more memory than this process has; run where more is free, or re-save the image as a tiled pyramidal TIFF"
    if "imagecodecs" in text or "requires" in text and "codec" in text.lower():
        return "its compression needs the imagecodecs package: `pip install imagecodecs`"
    return "the file is truncated or damaged; copy it again from the source"


def memory_headroom() -> int:
    """Bytes this process can still allocate: the least of the machine's available memory, the address-space limit
    (``ulimit -v``) less what the process maps, and its cgroup's limit less what the cgroup uses."""
    import resource

    room = []
    meminfo = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
        room.append(meminfo["MemAvailable"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            status = Path("/proc/self/status").read_text()
            mapped = int(re.search(r"VmSize:\s+(\d+)", status).group(1)) * 1024
        except (OSError, AttributeError):
            mapped = 0
        room.append(limit - mapped)
    try:
        top = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if top != "max":
            room.append(int(top) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(room)) if room else 1 << 62


def _refuse_too_large_to_decode(path: Path, im) -> None:
    """A JPEG/PNG is decoded whole: one whose pixels would not fit in memory is refused from its header, before."""
    per_pixel = {"1": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "I;16": 2, "I": 4, "F": 4}.get(im.mode, 4)
    need = im.width * im.height * (per_pixel + 6)  # the decoded image, its RGB conversion and the array
    room = memory_headroom()
    if need > room:
        raise FeatcacheError(
            f"{path} is {im.width:,} × {im.height:,} px: a {im.format or 'plain'} image is decoded whole, which needs "
            f"about {need / 2**30:.1f} GiB of memory, and this process has {room / 2**30:.1f} GiB. Convert it to a "
            "tiled pyramidal TIFF, which is read region by region (e.g. `vips tiffsave IMAGE out.tif --tile "
            "--pyramid --compression jpeg`), and pass that; or run where more memory is free."
        )


class Slide:
    """An RGB H&E image (TIFF family, read region by region; or JPEG/PNG, read once) as uint8."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tif = None
        self.compression = "none"
        self.notes: list[str] = []  # what was done to the pixels (conversions), for the log
        if self.path.suffix.lower() in PLAIN_SUFFIXES:
            self.levels = [self._read_plain()]
        else:
            self.levels = self._open_tiff()
        base = self.levels[0].shape
        self.downsample = [tuple(_downsample(b, n) for b, n in zip(base[:2], lvl.shape[:2])) for lvl in self.levels]
        self.scale = self._conversion(self.levels[0].dtype)

    def _open_tiff(self) -> list:
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self.compression = getattr(series.pages[0].compression, "name", str(series.pages[0].compression)).lower()
        except Exception as exc:  # noqa: BLE001 - tifffile raises several types for non-TIFF input
            raise FeatcacheError(f"cannot read {self.path} as a TIFF image ({str(exc)[:120]}).") from None
        levels = []
        for i, level in enumerate(series.levels):
            axes = level.axes.replace("Q", "")
            if axes == "YX" or (axes == "YXS" and level.shape[-1] not in (3, 4)):
                raise FeatcacheError(f"{self.path} is a single-channel image; an RGB H&E image is needed.")
            if axes not in ("YXS",):
                raise FeatcacheError(
                    f"{self.path}: level {i} has axes {level.axes} and shape {level.shape}; an RGB "
                    "H&E image (height × width × 3) is needed."
                )
            levels.append(zarr.open(series.aszarr(level=i), mode="r"))
        for i, level in enumerate(levels):
            self._refuse_chunks_too_large(i, level, tiled=series.levels[i].keyframe.is_tiled)
        return levels

    def _refuse_chunks_too_large(self, i: int, level, tiled: bool) -> None:
        """A TIFF is read region by region, but each tile or strip is decoded whole: one strip of a whole slide
        (RowsPerStrip = height, as some converters write) can need more memory than the process has."""
        rows, cols = level.chunks[:2]
        need = 2 * int(np.prod(level.chunks)) * level.dtype.itemsize  # the decoded chunk and the region it fills
        room = memory_headroom()
        if need > room:
            kind = "tiles" if tiled else "strips"
            raise FeatcacheError(
                f"{self.path} stores level {i} ({level.shape[1]:,} × {level.shape[0]:,} px) in {kind} of {cols:,} × "
                f"{rows:,} px, and each is decoded whole: about {need / 2**30:.1f} GiB of memory, while this process "
                f"has {room / 2**30:.1f} GiB. Re-save it as a tiled pyramidal TIFF (e.g. `vips tiffsave IMAGE out.tif "
                "--tile --pyramid --compression jpeg`) and pass that; or run where more memory is free."
            )

    def _read_plain(self) -> np.ndarray:
        from PIL import Image

        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = PIL_PIXEL_LIMIT
        try:
            with warnings.catch_warnings(), Image.open(self.path) as im:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.compression = (im.format or "image").lower()
                _refuse_too_large_to_decode(self.path, im)
                if im.width * im.height > 89_478_485:
                    self.notes.append(
                        f"{self.path.name}: {im.width} × {im.height} px read whole (Pillow's pixel limit "
                        f"raised to {PIL_PIXEL_LIMIT:,} for this whole-slide image)"
                    )
                arr = np.asarray(_as_rgb(im, self.path))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise FeatcacheError(f"cannot read {self.path} as an image ({str(exc)[:120]}).") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
        if arr.ndim != 3:
            raise FeatcacheError(f"{self.path} is a single-channel image; an RGB H&E image is needed.")
        return arr

    def _conversion(self, dtype) -> float | None:
        """None for uint8; else the factor that brings this image's pixel range to 0-255 (stated in notes)."""
        dtype = np.dtype(dtype)
        if dtype == np.uint8:
            return None
        thumb = np.asarray(
            self._read_raw(len(self.levels) - 1, 0, self.levels[-1].shape[0], 0, self.levels[-1].shape[1])
        )
        top = float(np.nanmax(thumb[..., :3])) if thumb.size else 0.0
        if dtype == np.uint16:
            full = 4095.0 if top <= 4095 else 65535.0
            self.notes.append(
                f"{self.path.name}: 16-bit pixels ({'12' if full == 4095 else '16'}-bit range) scaled to 8 bits"
            )
            return 255.0 / full
        if dtype.kind == "f" and np.isfinite(thumb).all() and thumb.min() >= 0 and top <= 255:
            self.notes.append(
                f"{self.path.name}: floating-point pixels in 0-{'1' if top <= 1 else '255'} converted to 8 bits"
            )
            return 255.0 if top <= 1 else 1.0
        raise FeatcacheError(
            f"{self.path} has {dtype} pixels (largest {top:g}) that featcache cannot map to 8-bit RGB "
            "unambiguously; convert the image to 8-bit RGB (e.g. with vips or tifffile) and pass it "
            "with --image."
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[:2])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def probe(self) -> None:
        """Decode the first and the last region of every level: a missing codec or a truncated file fails here."""
        for i, lvl in enumerate(self.levels):
            h, w = lvl.shape[:2]
            for r, c in ((0, 0), (h - 1, w - 1)):
                self.read(i, r, r + 1, c, c + 1)

    def choose_level(self, scale: float) -> int:
        """The coarsest level whose downsample does not exceed ``scale`` (full-res px per output px)."""
        usable = [i for i, d in enumerate(self.downsample) if max(d) <= scale * 1.001] or [0]
        return max(usable, key=lambda i: max(self.downsample[i]))

    def _read_raw(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        try:
            return self.levels[level][r0:r1, c0:c1, :3]
        except Exception as exc:  # noqa: BLE001 - codecs, zlib, tifffile and OS errors alike
            raise FeatcacheError(
                f"cannot decode {self.path} (level {level}, rows {r0}-{r1}, compression "
                f"{self.compression}): {_decode_hint(exc)}. ({type(exc).__name__}: "
                f"{str(exc)[:100]})"
            ) from None

    def read(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Pixels [r0:r1, c0:c1] of a level as uint8 RGB; outside the image is white."""
        h, w = self.levels[level].shape[:2]
        out = np.full((r1 - r0, c1 - c0, 3), WHITE, dtype=np.uint8)
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if rr0 < rr1 and cc0 < cc1:
            block = self._read_raw(level, rr0, rr1, cc0, cc1)
            if self.scale is not None:
                block = np.clip(np.rint(np.nan_to_num(block.astype(np.float64)) * self.scale), 0, 255)
            out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = block
        return out

    def metadata_mpp(self) -> tuple[float, str] | None:
        """Microns per pixel from the image's own metadata (OME-XML, Aperio description, TIFF resolution in
        cm/mm/µm), and where it came from; None when the image does not say."""
        if self._tif is None:
            return None
        page = self._tif.pages[0]
        if self._tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', self._tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', self._tif.ome_metadata)
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm")
            if m and factor:
                return float(m.group(1)) * factor, "OME-XML PhysicalSizeX"
        desc = page.description or ""
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.]+)", desc)
        if desc.startswith("Aperio") and m:
            return float(m.group(1)), "Aperio description (MPP)"
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            unit = int(tags["ResolutionUnit"].value)
            num, den = tags["XResolution"].value
            per_unit = num / den if den else 0.0
            um = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit)  # centimetre, millimetre, micrometre (never inch: dpi defaults)
            if um and per_unit > 0:
                return um / per_unit, "TIFF resolution tags"
        return None


def _as_rgb(im, path: Path):
    """A Pillow image as RGB; a grayscale one is refused as the grayscale TIFF is (not converted to gray RGB)."""
    if im.mode in ("1", "L", "LA", "I", "I;16", "F") or (im.mode == "P" and im.palette and im.palette.mode == "L"):
        raise FeatcacheError(f"{path} is a single-channel image; an RGB H&E image is needed.")
    return im if im.mode == "RGB" else im.convert("RGB")


def patch_coordinates(bin_map, r0: int, c0: int, geom: PatchGeometry = GEOMETRY) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution (row, col) of every output pixel centre of patch (r0, c0): two (px, px) arrays."""
    t = (np.arange(geom.patch_px) + 0.5) / geom.px_per_bin - 0.5
    rows, cols = np.meshgrid(r0 + t, c0 + t, indexing="ij")
    return bin_map.to_pixels(rows, cols)


def render_patch(slide: Slide, bin_map, r0: int, c0: int, geom: PatchGeometry = GEOMETRY) -> np.ndarray:
    """Resample the H&E on the bin lattice of patch (r0, c0) through ``bin_map``: uint8 (px, px, 3)."""
    half = geom.bins / 2
    scale = bin_map.px_per_bin(r0 + half - 0.5, c0 + half - 0.5) / geom.px_per_bin  # full-res px per output px
    level = slide.choose_level(scale)
    dr, dc = slide.downsample[level]
    pr, pc = patch_coordinates(bin_map, r0, c0, geom)
    lr, lc = (pr + 0.5) / dr - 0.5, (pc + 0.5) / dc - 0.5  # level pixel centres
    sigma = max(0.0, (scale / np.sqrt(dr * dc) - 1.0) / 2.0)  # anti-aliasing, as skimage.transform.rescale does
    margin = int(np.ceil(3 * sigma)) + 2
    lo = (int(np.floor(lr.min())) - margin, int(np.floor(lc.min())) - margin)
    hi = (int(np.ceil(lr.max())) + margin + 1, int(np.ceil(lc.max())) + margin + 1)
    region = slide.read(level, lo[0], hi[0], lo[1], hi[1]).astype(np.float32)
    if sigma > 0.05:
        region = ndimage.gaussian_filter(region, sigma=(sigma, sigma, 0), mode="nearest")
    coords = np.stack([lr - lo[0], lc - lo[1]])
    out = np.empty((geom.patch_px, geom.patch_px, 3), np.float32)
    for ch in range(3):
        out[..., ch] = ndimage.map_coordinates(region[..., ch], coords, order=1, mode="constant", cval=WHITE)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
