"""xarray views of everything featcache writes, for notebook sessions (lazy, Dask-backed).

    import analysis
    feats = analysis.open_features("demo", "uni2h", "P5")      # (patch, row, col, channel)
    run = analysis.open_run("featcache-data/runs/demo/uni2h/frozen/fold-P5")
    slide = analysis.stitch(run, "EPCAM")                      # the whole test slide, one map
    res = analysis.open_results("demo")                        # metrics over (encoder, mode, fold, gene)

The workspace is resolved as everywhere else: ``workspace=``, else ``$FEATCACHE_WORKSPACE``, else
``./featcache-data``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from featcache.errors import FeatcacheError
from featcache.workspace import Workspace

METRICS = ("pcc_gene", "pcc_global", "spearman_gene", "mse", "ssim_st")


def _open(path: Path, group: str | None = None, what: str = "store") -> xr.Dataset:
    if not Path(path).exists():
        raise FeatcacheError(f"{what} not found: {path}")
    return xr.open_zarr(path, group=group, consolidated=False)


def open_features(dataset: str, encoder: str, sample: str, workspace=None) -> xr.DataArray:
    """Token grids of one sample, (patch, row, col, channel), with patch origins as coordinates.

    ``origin_row`` / ``origin_col`` (per patch) are the array coordinates of each patch's bin (0, 0).
    """
    ws = Workspace.resolve(workspace)
    ds = _open(ws.features_store(dataset, encoder), sample, "feature store")
    origin = ds.origin.values
    tokens = ds.tokens.transpose("patch", "row", "col", "channel")
    return tokens.assign_coords(origin_row=("patch", origin[:, 0]), origin_col=("patch", origin[:, 1]))


def open_targets(dataset: str, sample: str, workspace=None) -> xr.Dataset:
    """Raw counts (patch, gene, row, col), library sizes and the in-tissue mask of one sample."""
    ws = Workspace.resolve(workspace)
    return _open(ws.targets_store(dataset), sample, "targets store")


def open_run(run_dir) -> xr.Dataset:
    """A run's test-patient predictions: pred, truth, mask (patch, gene, row, col), origins as coords.

    The run's metrics and settings are attached as ``attrs["metrics"]`` and ``attrs["config"]``.
    """
    run_dir = Path(run_dir)
    ds = _open(run_dir / "predictions.zarr", None, "predictions of run")
    for name in ("metrics", "config"):
        path = run_dir / f"{name}.json"
        if path.is_file():
            ds.attrs[name] = json.loads(path.read_text())
    return ds


def stitch(run: xr.Dataset, gene: str, var: str = "pred") -> xr.DataArray:
    """One gene of a run as a map of the whole test slide on the 8 µm bin grid.

    Each patch's 32 × 32 bins are placed at their array coordinates (origin + offset); bins no
    patch covers are NaN; where patches overlap (stride < 32) the values are averaged.
    """
    if gene not in run.gene.values:
        raise FeatcacheError(f"gene {gene!r} is not in this run's panel (e.g. {', '.join(map(str, run.gene.values[:5]))}).")
    values = run[var].sel(gene=gene).values if "gene" in run[var].dims else run[var].values
    origins = run.origin.values.astype(int)
    size = values.shape[-1]
    r0, c0 = origins.min(axis=0)
    rows, cols = origins.max(axis=0) - (r0, c0) + size
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    for v, (r, c) in zip(values.astype(np.float64), origins):
        total[r - r0 : r - r0 + size, c - c0 : c - c0 + size] += v
        count[r - r0 : r - r0 + size, c - c0 : c - c0 + size] += 1
    with np.errstate(invalid="ignore"):
        image = total / count
    return xr.DataArray(image, dims=("array_row", "array_col"),
                        coords={"array_row": np.arange(r0, r0 + rows), "array_col": np.arange(c0, c0 + cols)},
                        name=f"{gene}:{var}", attrs={"gene": gene, "variable": var, "units": "z-scored log1p(CP10k)"})


def stitch_image(dataset: str, sample: str, px_per_bin: int = 2, workspace=None) -> np.ndarray:
    """The sample's H&E as rendered into patches, stitched on the bin grid at px_per_bin (uint8 RGB)."""
    ws = Workspace.resolve(workspace)
    p = _open(ws.patches_store(dataset), sample, "patches store")
    origins = p.origin.values.astype(int)
    factor = 448 // (32 * px_per_bin)
    r0, c0 = origins.min(axis=0)
    rows, cols = (origins.max(axis=0) - (r0, c0) + 32) * px_per_bin
    out = np.full((rows, cols, 3), 255, np.uint8)
    side = 32 * px_per_bin
    for k, (r, c) in enumerate(origins):
        img = p.image[k].values.astype(np.float32)
        small = img.reshape(side, factor, side, factor, 3).mean(axis=(1, 3))
        y, x = (r - r0) * px_per_bin, (c - c0) * px_per_bin
        out[y : y + side, x : x + side] = np.rint(small).astype(np.uint8)
    return out


def open_results(dataset: str, workspace=None) -> xr.Dataset:
    """Test metrics of every finished run of a dataset, over (encoder, mode, fold[, gene])."""
    ws = Workspace.resolve(workspace)
    base = ws.root / "runs" / dataset
    found = sorted(base.glob("*/*/fold-*/metrics.json")) if base.is_dir() else []
    if not found:
        raise FeatcacheError(f"no finished runs for dataset {dataset!r} under {base}; train some with `train loocv`.")
    records = [json.loads(p.read_text()) for p in found]
    encoders = sorted({r["encoder"] for r in records})
    modes = sorted({r["run"] for r in records})
    folds = sorted({r["fold"] for r in records})
    genes = list(records[0]["per_gene"])
    shape = (len(encoders), len(modes), len(folds))
    data = {m: np.full(shape, np.nan) for m in METRICS}
    per_gene = {m: np.full((*shape, len(genes)), np.nan) for m in ("pcc", "spearman", "ssim")}
    for r in records:
        i, j, k = encoders.index(r["encoder"]), modes.index(r["run"]), folds.index(r["fold"])
        for m in METRICS:
            data[m][i, j, k] = np.nan if r.get(m) is None else r[m]
        for m in per_gene:
            per_gene[m][i, j, k] = [np.nan if r["per_gene"].get(g, {}).get(m) is None else r["per_gene"][g][m] for g in genes]
    dims = ("encoder", "mode", "fold")
    ds = xr.Dataset(
        {**{m: (dims, v) for m, v in data.items()}, **{f"{m}_per_gene": ((*dims, "gene"), v) for m, v in per_gene.items()}},
        coords={"encoder": encoders, "mode": modes, "fold": folds, "gene": genes},
        attrs={"dataset": dataset, "runs": [str(p.parent) for p in found]},
    )
    return ds
