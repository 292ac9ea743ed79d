"""xarray views of everything featcache writes, for notebook sessions (lazy, Dask-backed).

    import analysis
    feats = analysis.open_features("demo", "uni2h", "P5")      # (patch, row, col, channel)
    patches = analysis.open_patches("demo", "P5", px_per_bin=16)  # image_16px (patch, y, x, rgb)
    run = analysis.open_run("featcache-data/runs/demo/uni2h/frozen/fold-P5")
    slide = analysis.stitch(run, "EPCAM")                      # the whole test slide, one map
    res = analysis.open_results("demo")                        # metrics over (encoder, mode, fold, seed, gene)

The workspace is resolved as everywhere else: ``workspace=``, else ``$FEATCACHE_WORKSPACE``, else
``./featcache-data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, BinSums, bin_table
from featcache.stores import RunDir, Workspace
from featcache.stores.features import split_store_name

METRICS = ("pcc_gene", "pcc_global", "spearman_gene", "mse", "ssim_st")


def open_features(dataset: str, encoder: str, sample: str, workspace=None, features_root=None) -> xr.DataArray:
    """Token grids of one sample, lazily, with patch origins as coordinates.

    Parameters
    ----------
    dataset, sample : str
        A prepared dataset of the workspace and one of its samples.
    encoder : str
        The feature store's name: the encoder (``uni2h``), or ``<encoder>-random`` for random-init features.
    workspace : path, optional
        Workspace root [default: ``$FEATCACHE_WORKSPACE`` or ``./featcache-data``].
    features_root : str, optional
        Where the feature stores live, a folder or fsspec URL (``s3://bucket/prefix``) [default:
        ``$FEATCACHE_FEATURES_ROOT`` or the workspace's ``features/``].

    Returns
    -------
    xarray.DataArray
        (patch, row, col, channel), Dask-backed; ``origin_row`` / ``origin_col`` per patch are the
        array coordinates of each patch's bin (0, 0).
    """
    ws = Workspace.resolve(workspace, features_root)
    store = ws.feature_store(dataset, *split_store_name(encoder))
    if not store.exists():
        raise FeatcacheError(f"feature store not found: {store}. Make it with `{store.make_hint}`.")
    ds = store.open_sample(sample)
    origin = ds.origin.values
    tokens = ds.tokens.transpose("patch", "row", "col", "channel")
    return tokens.assign_coords(origin_row=("patch", origin[:, 0]), origin_col=("patch", origin[:, 1]))


def open_targets(dataset: str, sample: str, workspace=None) -> xr.Dataset:
    """Raw counts, library sizes and the in-tissue mask of one sample, lazily.

    Parameters
    ----------
    dataset, sample : str
        A prepared dataset of the workspace and one of its samples.
    workspace : path, optional
        Workspace root.

    Returns
    -------
    xarray.Dataset
        ``counts`` (patch, gene, row, col), ``library_size`` and ``mask`` (patch, row, col), with
        gene names, feature ids and patch origins as coordinates.
    """
    return Workspace.resolve(workspace).open_dataset(dataset).targets(sample)


def open_patches(dataset: str, sample: str, px_per_bin: int = GEOMETRY.px_per_bin, workspace=None) -> xr.Dataset:
    """One sample's image patches at one rendering, lazily.

    Parameters
    ----------
    dataset, sample : str
        A prepared dataset of the workspace and one of its samples.
    px_per_bin : int
        The rendering: 14 (``image``, 448 × 448 px, patch-14 ViTs and DenseNet) or 16 (``image_16px``,
        512 × 512 px, patch-16 encoders; made by ``featcache prepare --px-per-bin 14,16``).
    workspace : path, optional
        Workspace root.

    Returns
    -------
    xarray.Dataset
        ``image`` (or ``image_16px``) uint8 (patch, y, x, rgb) and ``origin`` (patch, axis); pixel block
        (i, j) of side ``px_per_bin`` is bin (origin_row + i, origin_col + j).
    """
    return Workspace.resolve(workspace).open_dataset(dataset).patches(sample, px_per_bin)


def open_run(run_dir) -> xr.Dataset:
    """A finished run's test-patient predictions.

    Parameters
    ----------
    run_dir : path
        A run folder, ``runs/<dataset>/<encoder>/<run>/fold-<fold>``.

    Returns
    -------
    xarray.Dataset
        ``pred``, ``truth`` (patch, gene, row, col) in the run's target space and ``mask``
        (patch, row, col), lazily, with origins as coordinates; the run's metrics and settings
        are in ``attrs["metrics"]`` and ``attrs["config"]``.
    """
    run = RunDir(Path(run_dir))
    ds = run.open_predictions()  # refused unless config.json and the predictions are of one run
    if run.is_finished():
        ds.attrs["metrics"] = run.read_metrics()
    ds.attrs["config"] = run.verified_config()
    return ds


def stitch(run: xr.Dataset, gene: str, var: str = "pred", sample: str | None = None) -> xr.DataArray:
    """One gene of a run as a map of the whole test slide on the 8 µm bin grid.

    Parameters
    ----------
    run : xarray.Dataset
        What :func:`open_run` returns (or any per-patch store with ``origin`` and ``gene``).
    gene : str
        A gene of the run's panel.
    var : str
        ``pred``, ``truth`` or ``mask``.
    sample : str, optional
        The section to draw when the run's test patient has several (its ``sample`` coordinate);
        required then, ignored for a single-section run.

    Returns
    -------
    xarray.DataArray
        (array_row, array_col): each patch's bins at their array coordinates (origin + offset);
        NaN where no patch lies; averaged where patches overlap (stride < 32), the same per-bin
        average the run's metrics scored (:class:`~featcache.geometry.BinSums`).
    """
    if gene not in run.gene.values:
        raise FeatcacheError(
            f"gene {gene!r} is not in this run's panel (e.g. {', '.join(map(str, run.gene.values[:5]))})."
        )
    if "sample" in run.coords:
        sections = [str(s) for s in np.unique(run["sample"].values)]
        if sample is None and len(sections) > 1:
            raise FeatcacheError(f"this run tests on several sections ({', '.join(sections)}); pass sample=NAME.")
        if sample is not None:
            if sample not in sections:
                raise FeatcacheError(f"section {sample!r} is not in this run (it has {', '.join(sections)}).")
            run = run.isel(patch=np.flatnonzero(run["sample"].values == sample))
    values = _read(run, var, run[var].sel(gene=gene) if "gene" in run[var].dims else None)
    sums = BinSums(run.origin.values, values)
    image = sums.grid()
    (r0, c0), (rows, cols) = sums.top_left, image.shape
    return xr.DataArray(
        image,
        dims=("array_row", "array_col"),
        coords={"array_row": np.arange(r0, r0 + rows), "array_col": np.arange(c0, c0 + cols)},
        name=f"{gene}:{var}",
        attrs={"gene": gene, "variable": var, "units": run.attrs.get("units", "z-scored log1p(CP10k)")},
    )


def section_bins(run: xr.Dataset, scored_only: bool = True, unnamed: str = ""):
    """A run's test predictions one row per bin, each section on its own, overlapping patches averaged.

    Yields (sample, (bins, 2) array (row, col), pred (bins, genes), truth (bins, genes), in-tissue
    fraction (bins,)); ``scored_only`` keeps the bins the metrics scored, else every bin of every
    patch. A run without a ``sample`` coordinate has one section, named ``unnamed``.
    """
    samples = _read(run, "sample") if "sample" in run.coords else np.full(run.sizes["patch"], unnamed)
    for s in np.unique(samples):
        k = np.flatnonzero(samples == s)
        origins, mask = _read(run, "origin")[k], _read(run, "mask")[k]
        keep = mask if scored_only else np.ones(mask.shape, bool)
        coords, pred = bin_table(origins, _read(run, "pred")[k], keep)
        _, truth = bin_table(origins, _read(run, "truth")[k], keep)
        _, tissue = bin_table(origins, mask.astype(np.float32), keep)
        yield str(s), coords, pred, truth, tissue


def _read(run: xr.Dataset, name: str, array: xr.DataArray | None = None) -> np.ndarray:
    """One variable of a run's predictions (or ``array``, a selection of it), read; a damaged chunk is one
    message naming the store."""
    try:
        return (run[name] if array is None else array).values
    except Exception as exc:  # checksum, decompression or a missing chunk file: zarr and numcodecs raise several
        where = run.encoding.get("source", "the run's predictions.zarr")
        raise FeatcacheError(
            f"cannot read {name} of {where} ({type(exc).__name__}: {str(exc)[:100]}); the predictions are "
            "damaged. Train the run again with --overwrite."
        ) from None


def stitch_image(dataset: str, sample: str, px_per_bin: int = 2, workspace=None) -> np.ndarray:
    """The sample's H&E as rendered into patches, stitched on the bin grid.

    Parameters
    ----------
    dataset, sample : str
        A prepared dataset and one of its samples.
    px_per_bin : int
        Output pixels per 8 µm bin (a divisor of 14).

    Returns
    -------
    numpy.ndarray
        uint8 RGB, (rows × px_per_bin, cols × px_per_bin, 3) over the bounding box of the patches.
    """
    d = Workspace.resolve(workspace).open_dataset(dataset)
    p = d.patches(sample)
    d.check_chunks(sample, ("image",))  # a missing chunk file would be read as white patches
    origins = p.origin.values.astype(int)
    bins = GEOMETRY.bins
    factor = GEOMETRY.patch_px // (bins * px_per_bin)
    r0, c0 = origins.min(axis=0)
    rows, cols = (origins.max(axis=0) - (r0, c0) + bins) * px_per_bin
    out = np.full((rows, cols, 3), 255, np.uint8)
    side = bins * px_per_bin
    for k, (r, c) in enumerate(origins):
        try:
            img = p.image[k].values.astype(np.float32)
        except Exception as exc:  # checksum, decompression: zarr and numcodecs raise several types
            raise d.read_error(sample, "image", k, exc) from None
        small = img.reshape(side, factor, side, factor, 3).mean(axis=(1, 3))
        y, x = (r - r0) * px_per_bin, (c - c0) * px_per_bin
        out[y : y + side, x : x + side] = np.rint(small).astype(np.uint8)
    return out


def open_results(dataset: str, workspace=None) -> xr.Dataset:
    """Test metrics of every finished run of a dataset.

    Parameters
    ----------
    dataset : str
        A dataset with finished runs in the workspace.
    workspace : path, optional
        Workspace root.

    Returns
    -------
    xarray.Dataset
        One variable per metric over (encoder, mode, fold, seed), and per-gene ``pcc_per_gene``,
        ``spearman_per_gene``, ``ssim_per_gene`` over (encoder, mode, fold, seed, gene); ``mode`` is
        the run name (e.g. ``frozen``, ``random-linear``), ``seed`` the training seed (each its own run).
    """
    ws = Workspace.resolve(workspace)
    found = [r for r in ws.runs(dataset) if r.is_finished()]
    if not found:
        raise FeatcacheError(
            f"no finished runs for dataset {dataset!r} under {ws.runs_dir(dataset)}; train some with `train loocv`."
        )
    records = [{**r.read_metrics(), "seed": (r.read_config() or {}).get("seed", 0)} for r in found]
    encoders = sorted({r["encoder"] for r in records})
    modes = sorted({r["run"] for r in records})
    folds = sorted({r["fold"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    genes = list(records[0]["per_gene"])
    shape = (len(encoders), len(modes), len(folds), len(seeds))
    data = {m: np.full(shape, np.nan) for m in METRICS}
    per_gene = {m: np.full((*shape, len(genes)), np.nan) for m in ("pcc", "spearman", "ssim")}
    for r in records:
        i, j, k = encoders.index(r["encoder"]), modes.index(r["run"]), folds.index(r["fold"])
        at = (i, j, k, seeds.index(r["seed"]))
        for m in METRICS:
            data[m][at] = np.nan if r.get(m) is None else r[m]
        for m in per_gene:
            per_gene[m][at] = [
                np.nan if r["per_gene"].get(g, {}).get(m) is None else r["per_gene"][g][m] for g in genes
            ]
    dims = ("encoder", "mode", "fold", "seed")
    ds = xr.Dataset(
        {
            **{m: (dims, v) for m, v in data.items()},
            **{f"{m}_per_gene": ((*dims, "gene"), v) for m, v in per_gene.items()},
        },
        coords={"encoder": encoders, "mode": modes, "fold": folds, "seed": seeds, "gene": genes},
        attrs={"dataset": dataset, "runs": [str(r.path) for r in found]},
    )
    return ds
