"""AnnData for users who continue in scanpy: a run's test predictions, a feature store's pooled features.

* :func:`run_anndata`: one observation per test bin (overlapping patches averaged as the metrics
  averaged them), in the per-bin layout of featcache/stores/h5ad.py (the one ``featcache predict``
  writes): ``X`` = the prediction, ``layers["pred"]`` / ``layers["truth"]`` in the run's target space,
  ``obs`` ``sample``, ``array_row``, ``array_col``, ``in_tissue``, and ``obsm["spatial"]`` = (x, y)
  full-resolution pixel centres from the sample's registration.
* :func:`features_anndata`: one observation per patch, ``X`` = the pooled embedding, ``obs`` the
  sample and the patch's origin, ``obsm["spatial"]`` the patch centre, ``obsm["grid_mean"]`` the
  token grid's mean over bins.
* :func:`export_h5ad`: either of them written as ``analysis export`` writes it (whole, or not at all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.api import section_bins
from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY
from featcache.registration import BinMap
from featcache.stores import RunDir, Workspace
from featcache.stores.features import split_store_name
from featcache.stores.files import staged_file
from featcache.stores.h5ad import BinRows, bin_names, bins_anndata


def _bin_map(ws: Workspace, dataset: str, sample: str) -> BinMap | None:
    ds = ws.dataset(dataset)
    return ds.bin_map(sample) if ds.exists() and sample in ds.samples else None


def run_anndata(run_dir, workspace=None):
    """A finished run's test bins as AnnData (see the module docstring).

    Parameters
    ----------
    run_dir : path
        A finished run folder.
    workspace : path, optional
        The workspace holding the run's dataset (for pixel positions) [default: as everywhere].

    Returns
    -------
    anndata.AnnData
    """
    ws = Workspace.resolve(workspace)
    run = RunDir(Path(run_dir))
    if run.read_config() is None or not run.is_finished():
        raise FeatcacheError(f"{run.path} is not a finished run folder.")
    run.read_metrics()  # config.json and metrics.json of one run, or refused
    config = run.verified_config()
    ds = run.open_predictions()
    parts = []
    for s, coords, pred, truth, tissue in section_bins(ds, scored_only=False, unnamed=config["fold"]):
        m = _bin_map(ws, config["dataset"], s)
        xy = np.column_stack(m.to_pixels(coords[:, 0], coords[:, 1])[::-1]) if m else None
        parts.append(BinRows(s, coords, tissue > 0.5, pred, {"pred": pred, "truth": truth}, xy))
    uns = {"featcache": {"run": str(run.path), "space": ds.attrs.get("space", ""), "fold": config["fold"]}}
    return bins_anndata(parts, ds["gene"].values, ds["gene_id"].values, uns=uns)


def features_anndata(dataset: str, encoder: str, workspace=None):
    """A feature store's pooled embeddings, one observation per patch (see the module docstring).

    Parameters
    ----------
    dataset : str
        The prepared dataset.
    encoder : str
        The store's name: ``uni2h``, or ``uni2h-random`` for random-init features.
    workspace : path, optional
        Workspace root.

    Returns
    -------
    anndata.AnnData
    """
    import anndata as ad
    import pandas as pd

    ws = Workspace.resolve(workspace)
    store = ws.feature_store(dataset, *split_store_name(encoder))
    if not store.is_complete():
        raise FeatcacheError(f"feature store {store} is missing or incomplete; make it with `{store.make_hint}`.")
    rows, names, pooled, grid_mean, xy = [], [], [], [], []
    half = GEOMETRY.bins / 2 - 0.5
    for s in store.identity["samples"]:
        f = store.open_sample(s)
        origins = f.origin.values
        pooled.append(f.pooled.values.astype(np.float32))
        tokens = f.tokens
        grid_mean.append(tokens.mean(dim=("row", "col")).transpose("patch", "channel").values.astype(np.float32))
        m = _bin_map(ws, dataset, s)
        centre = m.to_pixels(origins[:, 0] + half, origins[:, 1] + half) if m else (np.nan * origins[:, 0],) * 2
        xy.append(np.column_stack([centre[1], centre[0]]))
        rows += [(s, int(r), int(c)) for r, c in origins]
        names.append(bin_names(s, origins))  # each patch named by its bin (0, 0)
    obs = pd.DataFrame(rows, columns=["sample", "origin_row", "origin_col"])
    obs.index = np.concatenate(names)
    adata = ad.AnnData(
        X=np.concatenate(pooled), obs=obs, obsm={"spatial": np.concatenate(xy), "grid_mean": np.concatenate(grid_mean)}
    )
    adata.uns["featcache"] = {"store": str(store), "identity": store.identity}
    return adata


def export_h5ad(
    run_dir=None, features: str | None = None, dataset: str = "demo", output=None, overwrite=False, workspace=None
) -> tuple[Path, object]:
    """``analysis export``: a run's test bins (``run_dir``) or a feature store's pooled features (``features`` of
    ``dataset``) as a .h5ad, at ``output`` [default: ``results/<dataset>/exports/``]; returns (path, AnnData).

    The file is written under a hidden name and moved into place whole; an existing one is replaced only with
    ``overwrite``.
    """
    if (run_dir is None) == (features is None):
        raise FeatcacheError("give --run RUN_DIR or --features STORE (with --dataset), one of the two.")
    ws = Workspace.resolve(workspace)
    if run_dir is not None:
        adata = run_anndata(run_dir, ws)
        config = RunDir(Path(run_dir)).verified_config()
        name = f"{config['encoder']}-{config['run']}-fold-{config['fold']}.h5ad"
        results = ws.results(config["dataset"])
    else:
        adata = features_anndata(dataset, features, ws)
        name, results = f"{features}-pooled.h5ad", ws.results(dataset)
    path = Path(output) if output is not None else results.path / "exports" / name
    if path.is_dir():
        raise FeatcacheError(
            f"{path} is a folder; --output names the .h5ad file to write (e.g. {path / name}), and a folder is never "
            "replaced by one."
        )
    if path.exists() and not overwrite:
        raise FeatcacheError(f"{path} exists; pass --overwrite to replace it, or choose another --output.")
    with staged_file(path) as tmp:
        adata.write_h5ad(tmp)
    return path, adata
