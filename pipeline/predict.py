"""``featcache predict``: a trained run applied to H&E slides that have no Visium data.

The run folder holds everything needed: the encoder's identity and weights' identity
(``config.json``), the decoder (``checkpoint.pt``, read as plain tensors), the gene panel and the
target transform. A slide is cut into patches of 32 × 32 bins on an 8 µm lattice, rendered at the run's
encoder's pixels per bin (448 px at 14, 512 px for a patch-16 encoder at 16) — its own Space Ranger
lattice with ``--positions`` (the same patches ``prepare`` cuts, so predictions can be set
against measured counts), else a virtual lattice aligned with the image axes over the tissue
found on a thumbnail — read region by region, encoded, decoded, and written as a Zarr store, an
AnnData file that scanpy and squidpy draw, and maps of chosen genes. The store's format belongs
to featcache/stores/predictions.py.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.errors import FeatcacheError
from featcache.geometry import BIN_UM, GEOMETRY, bin_table, covering_origins, geometry_for
from featcache.progress import progress
from featcache.provenance import library_versions
from featcache.registration import BinMap
from featcache.slide import Slide, render_patch
from featcache.stores import Workspace, check_name
from featcache.stores.h5ad import BinRows, BinsH5adWriter, spatial_uns
from featcache.streams import ChunkWriter, Prefetcher
from train.model import TrainedRun, load_run

VIRTUAL_MIN_TISSUE = 0.01  # without positions, keep every window with some tissue: cover the whole section


@dataclass
class Lattice:
    """The 8 µm bins a slide is predicted on: in-tissue grid, patch origins and each patch's bin map."""

    name: str
    in_tissue: np.ndarray  # (rows, cols)
    origins: np.ndarray
    map_for: object  # (r0, c0) -> BinMap
    pitch_px: float
    mpp: float
    source: str
    checks: dict | None = None  # how --positions were found to belong to the image

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "grid": list(self.in_tissue.shape),
            "patches": len(self.origins),
            "in_tissue_bins": int(self.in_tissue.sum()),
            "microns_per_pixel": self.mpp,
            "px_per_bin": self.pitch_px,
            **({"positions_check": self.checks} if self.checks else {}),
        }


def positions_lattice(
    name: str, positions: Path, image: Path, stride: int, min_tissue: float, slide: Slide, px_per_bin: int = 14
) -> Lattice:
    """A Space Ranger sample's own lattice, cut as ``prepare`` cuts it (its image checked fine enough to render at
    ``px_per_bin``)."""
    from featcache.visium import open_sample

    # refuses bins outside the image's extent, and an image too coarse for the encoder's rendering
    s = open_sample(name, positions, image, counts=False, px_per_bin=px_per_bin)
    checked = _check_on_tissue(s, slide)
    in_tissue, _, origins = s.plan_patches(stride, min_tissue)
    return Lattice(
        name,
        in_tissue,
        origins,
        s.registration.map_for,
        s.registration.px_per_bin,
        s.microns_per_pixel,
        f"Space Ranger positions ({s.bin_dir})",
        checked,
    )


def _check_on_tissue(s, slide: Slide) -> dict:
    """Refuse positions of another slide; returns what was checked (for prediction.json).

    First the image: Space Ranger keeps downscales of the very image it registered the bins to
    (``spatial/tissue_lowres_image.png``, ``tissue_hires_image.png``), which must show this slide's texture where
    this slide shows it (:func:`featcache.tissue.image_agreement`). Then, as a second line (and the only one when
    those images are missing), the in-tissue bins must sit on this image's tissue and the others mostly not."""
    from featcache import spaceranger as sr
    from featcache.tissue import (
        IMAGE_CELL_BINS,
        MIN_AGREEMENT,
        MIN_IMAGE_NCC,
        image_agreement,
        positions_agreement,
        thumbnail,
        tissue_mask,
    )
    from featcache.visium import registered_image

    pitch = s.registration.px_per_bin
    thumb, scale = thumbnail(slide, pitch / 2)
    p = s.positions
    checked: dict = {}
    found = registered_image(s.bin_dir / sr.SPATIAL, s.scalefactors, IMAGE_CELL_BINS * pitch)
    if isinstance(found, str):
        checked["image_check"] = f"not possible: {found}"
    else:
        path, pixels, scalef = found
        h, w = slide.shape
        extent = (
            max(0.0, p.pxl_row_in_fullres.min() - pitch),
            min(float(h), p.pxl_row_in_fullres.max() + pitch),
            max(0.0, p.pxl_col_in_fullres.min() - pitch),
            min(float(w), p.pxl_col_in_fullres.max() + pitch),
        )
        ncc = image_agreement(thumb, scale, pixels, scalef, pitch, extent)
        checked.update(image_check=str(path), image_ncc=round(ncc, 3))
        if ncc < MIN_IMAGE_NCC:
            raise FeatcacheError(
                f"the positions of {s.bin_dir} do not belong to {slide.path}: {path} (Space Ranger's downscale of "
                f"the image it registered those bins to) and this image correlate {ncc:.2f} over the bins' area "
                f"(the same slide: near 1; refused below {MIN_IMAGE_NCC}). Pass the Space Ranger output of this "
                "slide with --positions, or leave --positions out to predict on a lattice of the image itself."
            )
    inside, outside = positions_agreement(
        tissue_mask(thumb), scale, p.pxl_row_in_fullres, p.pxl_col_in_fullres, p.in_tissue
    )
    checked.update(in_tissue_bins_on_tissue=round(inside, 3), other_bins_on_tissue=round(outside, 3))
    if inside - outside < MIN_AGREEMENT:
        raise FeatcacheError(
            f"the positions of {s.bin_dir} do not belong to {slide.path}: {inside:.0%} of their in-tissue bins and "
            f"{outside:.0%} of the others lie on this image's tissue (a slide's own positions: most of the first, "
            "few of the second)"
            + (f"; the image check was {checked['image_check']}" if isinstance(found, str) else "")
            + ". Pass the Space Ranger output of this slide with --positions, or leave --positions out to predict "
            "on a lattice of the image itself."
        )
    return checked


def virtual_lattice(
    name: str, slide: Slide, mpp: float | None, stride: int, min_tissue: float, px_per_bin: int = 14
) -> tuple[Lattice, dict]:
    """Axis-aligned 8 µm bins over the tissue found on a thumbnail; (lattice, how µm/px was found). The image must
    be fine enough to render at ``px_per_bin`` (the run's encoder's) without upsampling it more than 1.25×."""
    from featcache.tissue import bins_in_tissue, thumbnail, tissue_mask
    from featcache.visium import MAX_UPSAMPLING

    if mpp is None:
        found = slide.metadata_mpp()
        if found is None:
            raise FeatcacheError(
                f"{slide.path} does not say how many µm a pixel is (no OME-XML, Aperio MPP or TIFF "
                "resolution in cm/mm/µm); pass --mpp (e.g. --mpp 0.25 for a 40× scan)."
            )
        mpp, how = found
    else:
        how = "--mpp"
    if not 0.05 <= mpp <= 2.0:
        if how != "--mpp":
            raise FeatcacheError(
                f"{slide.path}: its {how} say {mpp:.4g} µm per pixel, which no microscope image has (0.05 to 2): "
                "the metadata is a placeholder. Pass the scan's --mpp (e.g. --mpp 0.25 for a 40× scan)."
            )
        raise FeatcacheError(f"--mpp {mpp}: a microscope image has 0.05 to 2 µm per pixel.")
    pitch = BIN_UM / mpp
    need = px_per_bin / MAX_UPSAMPLING
    if pitch < need:
        raise FeatcacheError(
            f"{slide.path} has {pitch:.1f} px per 8 µm bin ({mpp} µm/px); rendering "
            f"{px_per_bin} px per bin (the run's encoder's) needs at least {need:.1f} (≤ {BIN_UM / need:.2f} µm/px)."
        )
    thumb, scale = thumbnail(slide, pitch / 2)
    rows, cols = int(slide.shape[0] // pitch), int(slide.shape[1] // pitch)
    in_tissue = bins_in_tissue(tissue_mask(thumb), scale, pitch, rows, cols)
    if not in_tissue.any():
        raise FeatcacheError(
            f"no tissue found on {slide.path} (saturation is flat: an empty or blank slide?). Check the "
            "image, or predict on a Space Ranger lattice with --positions."
        )
    origins, in_tissue = covering_origins(in_tissue, stride, min_tissue)
    if len(origins) == 0:
        raise FeatcacheError(
            f"{slide.path}: tissue found, but no 32 × 32-bin window has {min_tissue:.0%} of it; lower --min-tissue."
        )
    m = np.array(
        [[pitch, 0, pitch / 2 - 0.5], [0, pitch, pitch / 2 - 0.5], [0, 0, 1.0]]
    )  # bin centres on the pixel grid
    return Lattice(name, in_tissue, origins, lambda r0, c0: BinMap(m), pitch, mpp, "virtual, axis-aligned"), {
        "microns_per_pixel_source": how
    }


@dataclass
class PredictResult:
    path: Path
    patches: int
    bins: int
    seconds: float
    tiles_per_s: float
    figures: list[Path]
    notes: tuple[str, ...] = ()  # what the user should know (a check that could not be made)


def render_workers(dev: torch.device) -> int:
    """Rendering threads by default: on a GPU rendering is the host's whole job (~26 ms a patch per core, so a
    ViT's 150-250 tiles/s needs 4-7 of them); on a CPU the model needs the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(12, cores - 2)) if dev.type == "cuda" else min(2, cores)


@dataclass(frozen=True)
class PredictOptions:
    """What is predicted and drawn: the lattice of 8 µm bins and the gene maps (not where, not how fast)."""

    positions: str | os.PathLike | None = None  # a Space Ranger square_008um/ (or outs/): that sample's own lattice
    mpp: float | None = None  # µm per pixel of the virtual lattice; None: from the image's metadata
    stride: int | None = None  # bins between patch origins; None: the run's dataset's
    min_tissue: float | None = None  # None: the run's dataset's with positions, else VIRTUAL_MIN_TISSUE
    genes: tuple[str, ...] = ()  # genes drawn as maps over the slide

    def __post_init__(self):
        if self.min_tissue is not None and not 0 <= self.min_tissue <= 1:
            raise FeatcacheError(f"--min-tissue {self.min_tissue}: must be a fraction between 0 and 1.")
        if self.stride is not None and self.stride < 1:
            raise FeatcacheError(f"stride {self.stride}: must be at least 1 bin.")


@dataclass(frozen=True)
class PredictRuntime:
    """How a prediction is computed and written, never what it holds."""

    device: str = "auto"
    batch_size: int = 16  # patches per forward pass
    workers: int | None = None  # rendering threads; None: render_workers(device)
    overwrite: bool = False  # replace an existing prediction folder
    show_progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise FeatcacheError("--batch-size and --workers must be at least 1.")


def predict(
    run_dir,
    image,
    options: PredictOptions | None = None,
    *,
    weights: str | None = None,
    workspace=None,
    output=None,
    **runtime,
) -> PredictResult:
    """Predict the run's gene panel on every 8 µm bin of the slide's tissue; write the prediction folder.

    ``weights``: the encoder checkpoint the run was trained on (refused unless its identity is the
    run's); ``output``: the folder [default: ``predictions/<run>/<slide>/`` in the workspace];
    ``runtime``: the fields of :class:`PredictRuntime`.
    """
    t_start = time.perf_counter()
    opts = options or PredictOptions()
    rt = PredictRuntime(**runtime)
    image = Path(image)
    if not image.is_file():
        raise FeatcacheError(f"slide not found: {image}")
    dev = resolve_device(rt.device)
    workers = rt.workers or render_workers(dev)
    run = load_run(run_dir, weights, dev)
    unknown = [g for g in opts.genes if g not in run.genes]
    if unknown:
        raise FeatcacheError(f"--genes: {', '.join(unknown)} not in the run's panel (e.g. {', '.join(run.genes[:5])}).")
    patching = run.config.get("patching") or {}
    stride = opts.stride or int(patching.get("stride_bins") or GEOMETRY.bins)
    if opts.min_tissue is not None:
        min_tissue = opts.min_tissue
    else:
        min_tissue = patching.get("min_tissue", 0.5) if opts.positions is not None else VIRTUAL_MIN_TISSUE
    px_per_bin = run.px_per_bin
    if patching.get("px_per_bin", px_per_bin) != px_per_bin:
        raise FeatcacheError(
            f"{run.run.path} was trained on patches at {patching['px_per_bin']} px per bin, but encoder "
            f"{run.config['encoder']} now reads {px_per_bin} px per bin (its registry entry changed); predict with "
            "the featcache version that trained the run, or train it again."
        )
    slide_name = slide_name_of(image)
    ws = Workspace.resolve(workspace)
    target = ws.prediction_dir(run.label, slide_name) if output is None else _output_dir(ws, output)
    target.claim(rt.overwrite)
    with Slide(image) as slide:
        slide.probe()
        if opts.positions is not None:
            lattice = positions_lattice(slide_name, Path(opts.positions), image, stride, min_tissue, slide, px_per_bin)
            how = {"microns_per_pixel_source": "Space Ranger scale factors"}
        else:
            lattice, how = virtual_lattice(slide_name, slide, opts.mpp, stride, min_tissue, px_per_bin)
        result = _run(
            run,
            lattice,
            slide,
            target,
            dev,
            rt.batch_size,
            workers,
            rt.show_progress,
            opts.genes,
            {
                "run": str(run.run.path),
                "run_label": run.label,
                "encoder": run.config["encoder"],
                "mode": run.config["mode"],
                "weights": run.weights,
                "slide": str(image),
                "lattice": {**lattice.describe(), **how},
                "stride_bins": stride,
                "rendering": geometry_for(px_per_bin).to_json(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "libraries": library_versions(),
                "target": run.transform.kind,
                **_count_model(run),
                "notes": slide.notes,
            },
        )
    result.seconds = time.perf_counter() - t_start
    unchecked = (lattice.checks or {}).get("image_check", "")
    if unchecked.startswith("not possible"):
        result.notes = (f"--positions checked by tissue overlap alone; the image check was {unchecked}",)
    return result


def _count_model(run: TrainedRun) -> dict:
    """A count-loss run (docs/design.md §6): its loss and the library size its rates were mapped with."""
    return {} if run.exposure is None else {"loss": run.loss, "exposure": run.exposure}


def slide_name_of(image: Path) -> str:
    """A safe name for a slide from any file name: ``my slide (2).ome.tif`` → ``my_slide_2``."""
    stem = re.sub(r"[^A-Za-z0-9_+-]+", "_", image.name.split(".")[0]).strip("_+-")
    return check_name(stem[:100] or "slide", "slide")


def _output_dir(ws: Workspace, output):
    from featcache.stores.predictions import PredictionDir

    path = Path(output).expanduser().absolute()
    ws.check_output(str(path))
    return PredictionDir(path)


def _run(
    run: TrainedRun, lattice: Lattice, slide: Slide, target, dev, batch_size, workers, show_progress, genes, meta
) -> PredictResult:
    from featcache.device import autocast

    origins, b = lattice.origins, GEOMETRY.bins
    geom = geometry_for(run.px_per_bin)  # the rendering the run's encoder read in training (docs/design.md §2)
    render = lambda rc: render_patch(slide, lattice.map_for(*rc), int(rc[0]), int(rc[1]), geom)  # noqa: E731
    t0, done = time.perf_counter(), 0
    with (
        target.writer(
            len(origins),
            run.genes,
            run.gene_ids,
            origins,
            {
                "units": "z" if run.transform.zscored else run.transform.kind,
                "bins_per_patch": b,
                "expression": "log1p(CP10k)" if run.transform.zscored else "log1p(counts)",
            },
        ) as w,
        progress(disable=not show_progress) as bar,
    ):
        task = bar.add_task(f"predicting {lattice.name}", total=len(origins), rate="")
        rendered = iter(Prefetcher(render, origins, workers=workers, depth=2 * batch_size, name="featcache-predict"))
        store = lambda item: w.write(item[0], **_blocks(run, lattice, *item[1:]))  # noqa: E731
        try:
            # the model runs while the previous batch is converted and compressed in the writer thread
            with ChunkWriter(store, threads=1, depth=2, name="featcache-predict-writer") as writer:
                for start in range(0, len(origins), batch_size):
                    part = origins[start : start + batch_size]
                    x = torch.from_numpy(np.stack([next(rendered) for _ in part])).to(dev)
                    with torch.inference_mode(), autocast(dev):
                        z = run.model(x).float().cpu().numpy()
                    writer.put((start, part, z))
                    done += len(part)
                    bar.update(
                        task, advance=len(part), rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} tiles/s"
                    )
        finally:
            rendered.close()
        seconds = time.perf_counter() - t0
        n_bins = _write_h5ad(w, run, lattice, slide)
        figures = _gene_maps(w, lattice, slide, genes) if genes else []
        w.commit(
            {
                **meta,
                "patches": len(origins),
                "bins": n_bins,
                "seconds": round(seconds, 2),
                "tiles_per_s": round(len(origins) / max(seconds, 1e-9), 2),
            }
        )
    return PredictResult(
        target.path,
        len(origins),
        n_bins,
        seconds,
        len(origins) / max(seconds, 1e-9),
        [target.path / "figures" / f.name for f in figures],
    )


def _blocks(run: TrainedRun, lattice: Lattice, origins: np.ndarray, z: np.ndarray) -> dict:
    b = GEOMETRY.bins
    expression = run.expression(z)
    rows, cols = [], []
    for r0, c0 in origins:
        m = lattice.map_for(r0, c0)
        rr, cc = np.meshgrid(np.arange(r0, r0 + b), np.arange(c0, c0 + b), indexing="ij")
        pr, pc = m.to_pixels(rr, cc)
        rows.append(pr)
        cols.append(pc)
    tissue = np.stack([lattice.in_tissue[r : r + b, c : c + b] for r, c in origins])
    return {
        "z": z.astype(np.float16),
        "expression": expression.astype(np.float16),
        "in_tissue": tissue,
        "pxl_row": np.stack(rows).astype(np.float32),
        "pxl_col": np.stack(cols).astype(np.float32),
    }


def _display(slide: Slide, longest: int = 2000) -> tuple[np.ndarray, float]:
    from featcache.tissue import thumbnail

    return thumbnail(slide, max(1.0, max(slide.shape) / longest))


H5AD_BAND = 64  # lattice rows of bins gathered at a time when writing the .h5ad


def _write_h5ad(w, run: TrainedRun, lattice: Lattice, slide: Slide) -> int:
    """One observation per bin (overlapping patches averaged), in the layout of featcache/stores/h5ad.py;
    returns the bin count.

    Written band by band of lattice rows, so memory does not grow with the slide: a band's bins take their
    averages from every patch that reaches into the band (so from all the patches that hold them).
    """
    import zarr

    root = zarr.open_group(zarr.storage.LocalStore(w.zarr_path, read_only=True), mode="r")
    origins, b, g = np.asarray(lattice.origins), GEOMETRY.bins, len(run.genes)
    with BinsH5adWriter(w.h5ad_path, run.genes, run.gene_ids, [lattice.name], layers=("z",)) as h5:
        for top in range(int(origins[:, 0].min()), int(origins[:, 0].max()) + b, H5AD_BAND):
            sel = np.nonzero((origins[:, 0] > top - b) & (origins[:, 0] < top + H5AD_BAND))[0]
            if not len(sel):
                continue
            rows_in_band = origins[sel, 0, None] + np.arange(b)[None, :]  # (patch, row)
            keep = np.broadcast_to(
                ((rows_in_band >= top) & (rows_in_band < top + H5AD_BAND))[:, :, None], (len(sel), b, b)
            )
            maps = np.concatenate(  # (patch, expression genes + z genes + (x, y), row, col): one pass of sums
                [root[k].get_orthogonal_selection((sel,)).astype(np.float32) for k in ("expression", "z")]
                + [np.stack([root[k].get_orthogonal_selection((sel,)) for k in ("pxl_col", "pxl_row")], axis=1)],
                axis=1,
            )
            coords, values = bin_table(origins[sel], maps, keep)
            tissue = lattice.in_tissue[coords[:, 0], coords[:, 1]]
            h5.append(BinRows(lattice.name, coords, tissue, values[:, :g], {"z": values[:, g:-2]}, values[:, -2:]))
        thumb, scale = _display(slide)
        h5.finish(
            {
                "spatial": spatial_uns(lattice.name, thumb, scale, lattice.pitch_px, "featcache predict"),
                "featcache": {
                    "run": str(run.run.path),
                    "target": run.transform.kind,
                    "lattice": lattice.source,
                    **_count_model(run),
                },
            }
        )
    return h5.n_obs


def _gene_maps(w, lattice: Lattice, slide: Slide, genes) -> list[Path]:
    """A map per gene over the slide's thumbnail: each bin a square in its colour."""
    import anndata as ad
    from matplotlib.figure import Figure

    adata = ad.read_h5ad(w.h5ad_path, backed="r")  # one gene's column read at a time
    thumb, scale = _display(slide)
    tissue = adata.obs["in_tissue"].to_numpy() == 1  # glass stays visible around the section
    xy = adata.obsm["spatial"][tissue] * scale
    size = max(0.5, lattice.pitch_px * scale) ** 2
    w.figures_dir.mkdir(exist_ok=True)
    written = []
    for gene in genes:
        values = np.asarray(adata[:, gene].X).ravel()[tissue]
        lo, hi = np.percentile(values, [1, 99])
        fig = Figure(figsize=(7, 7 * thumb.shape[0] / thumb.shape[1] + 0.6), layout="constrained")
        ax = fig.subplots()
        ax.imshow(thumb)
        dots = ax.scatter(
            xy[:, 0], xy[:, 1], c=values, s=size, marker="s", cmap="viridis", vmin=lo, vmax=hi, alpha=0.85, linewidths=0
        )
        units = "log1p(CP10k)" if "cp10k" in adata.uns["featcache"]["target"] else "log1p(counts)"
        ax.set_axis_off()
        ax.set_title(f"{gene}: predicted {units}, in-tissue bins of {lattice.name}", fontsize=9)
        fig.colorbar(dots, ax=ax, shrink=0.7, label=units)
        path = w.figures_dir / f"{gene}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    adata.file.close()
    return written
