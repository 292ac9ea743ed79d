"""AnnData for users who continue in scanpy: a run's test predictions, a feature store's pooled features.

* :func:`run_anndata`: one observation per scored test bin (overlapping patches averaged), ``X`` =
  the prediction, ``layers["pred"]`` / ``layers["truth"]`` in the run's target space, ``obs``
  ``sample``, ``array_row``, ``array_col``, ``in_tissue``, and ``obsm["spatial"]`` = (x, y) full-resolution
  pixel centres from the sample's registration.
* :func:`features_anndata`: one observation per patch, ``X`` = the pooled embedding, ``obs`` the
  sample and the patch's origin, ``obsm["spatial"]`` the patch centre, ``obsm["grid_mean"]`` the
  token grid's mean over bins.
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
    import anndata as ad
    import pandas as pd

    ws = Workspace.resolve(workspace)
    run = RunDir(Path(run_dir))
    config = run.read_config()
    if config is None or not run.is_finished():
        raise FeatcacheError(f"{run.path} is not a finished run folder.")
    ds = run.open_predictions()
    parts = []
    for s, coords, pred, truth, tissue in section_bins(ds, scored_only=False, unnamed=config["fold"]):
        m = _bin_map(ws, config["dataset"], s)
        xy = np.column_stack(m.to_pixels(coords[:, 0], coords[:, 1])[::-1]) if m else np.full((len(coords), 2), np.nan)
        parts.append((s, coords, pred, truth, tissue > 0.5, xy))
    obs = pd.DataFrame(
        {
            "sample": np.concatenate([[s] * len(c) for s, c, *_ in parts]),
            "array_row": np.concatenate([c[:, 0] for _, c, *_ in parts]),
            "array_col": np.concatenate([c[:, 1] for _, c, *_ in parts]),
            "in_tissue": np.concatenate([t for *_, t, _ in parts]).astype(np.int8),
        }
    )
    obs.index = [f"{s}_{r:05d}_{c:05d}" for s, r, c in zip(obs["sample"], obs["array_row"], obs["array_col"])]
    pred = np.concatenate([p for _, _, p, *_ in parts]).astype(np.float32)
    adata = ad.AnnData(
        X=pred,
        obs=obs,
        layers={"pred": pred, "truth": np.concatenate([p[3] for p in parts]).astype(np.float32)},
        obsm={"spatial": np.concatenate([p[5] for p in parts])},
    )
    adata.var_names = [str(g) for g in ds["gene"].values]
    adata.var["gene_id"] = [str(g) for g in ds["gene_id"].values]
    adata.uns["featcache"] = {"run": str(run.path), "space": ds.attrs.get("space", ""), "fold": config["fold"]}
    return adata


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
    rows, pooled, grid_mean, xy = [], [], [], []
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
    obs = pd.DataFrame(rows, columns=["sample", "origin_row", "origin_col"])
    obs.index = [f"{s}_{r:05d}_{c:05d}" for s, r, c in rows]
    adata = ad.AnnData(
        X=np.concatenate(pooled), obs=obs, obsm={"spatial": np.concatenate(xy), "grid_mean": np.concatenate(grid_mean)}
    )
    adata.uns["featcache"] = {"store": str(store), "identity": store.identity}
    return adata
