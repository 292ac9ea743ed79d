"""`featcache prepare`: the token <-> bin invariant, targets, stores, idempotence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
from conftest import BIN8
from scipy import ndimage

from featcache.errors import FeatcacheError
from featcache.geometry import patch_origins
from featcache.prepare import prepare_dataset
from featcache.stores import Workspace


def test_stores_open_in_xarray_with_labels(prepared):
    ws, res = prepared
    w = Workspace(ws)
    meta = json.loads(w.dataset("tiny").meta_path.read_text())
    assert set(meta["samples"]) == {"P1", "P2"} and len(meta["genes"]["ids"]) == 50
    for s in ("P1", "P2"):
        p = xr.open_zarr(w.dataset("tiny").patches_path, group=s)
        t = xr.open_zarr(w.dataset("tiny").targets_path, group=s)
        n = meta["samples"][s]["n_patches"]
        assert n == res.patches[s] > 0
        assert p.image.dims == ("patch", "y", "x", "rgb") and p.image.shape == (n, 448, 448, 3)
        assert p.image.dtype == np.uint8 and p.origin.dtype == np.int32
        assert t.counts.dims == ("patch", "gene", "row", "col") and t.counts.shape == (n, 50, 32, 32)
        assert t.mask.dtype == bool and t.library_size.dims == ("patch", "row", "col")
        assert list(t.gene.values) == meta["genes"]["names"]
        assert list(t.gene_id.values) == meta["genes"]["ids"]
        assert np.array_equal(t.origin.values, p.origin.values)


def test_targets_equal_scanpy_counts_and_mask_matches_in_tissue(prepared, synth_dir):
    import scanpy as sc

    ws, _ = prepared
    w = Workspace(ws)
    for s in ("P1", "P2"):
        adata = sc.read_10x_h5(synth_dir / s / BIN8 / "filtered_feature_bc_matrix.h5")
        pos = pd.read_parquet(synth_dir / s / BIN8 / "spatial" / "tissue_positions.parquet")
        t = xr.open_zarr(w.dataset("tiny").targets_path, group=s).load()
        grid = pos.pivot(index="array_row", columns="array_col", values="barcode").to_numpy()
        tissue = pos.pivot(index="array_row", columns="array_col", values="in_tissue").to_numpy().astype(bool)
        gene_cols = [list(adata.var["gene_ids"]).index(g) for g in t.gene_id.values]
        dense = adata.X.toarray()
        row_of = {b: i for i, b in enumerate(adata.obs_names)}
        for k, (r0, c0) in enumerate(t.origin.values):
            bcs = grid[r0 : r0 + 32, c0 : c0 + 32]
            assert np.array_equal(t.mask.values[k], tissue[r0 : r0 + 32, c0 : c0 + 32])
            idx = np.array([[row_of.get(b, -1) for b in line] for line in bcs])
            expect = np.where(idx[..., None] >= 0, dense[np.maximum(idx, 0)][..., gene_cols], 0)
            assert np.array_equal(t.counts.values[k], expect.transpose(2, 0, 1))
            lib = np.where(idx >= 0, dense[np.maximum(idx, 0)].sum(-1), 0)
            assert np.array_equal(t.library_size.values[k], lib)


@pytest.mark.parametrize("sample", ["P1", "P2"])  # P2: rotated -1.3° and flipped
def test_token_ij_sits_on_bin_r0_plus_i(synth_dir, tmp_path, sample):
    """Paint green dots on chosen bins of the full-res image; find them at the right tokens."""
    src = synth_dir / sample
    pos = pd.read_parquet(src / BIN8 / "spatial" / "tissue_positions.parquet")
    image = tifffile.imread(src / f"{sample}_tissue_image.btf")
    rng = np.random.default_rng(0)
    tissue = pos[pos.in_tissue == 1]
    marks = tissue.iloc[rng.choice(len(tissue), 60, replace=False)]
    rc = marks[["array_row", "array_col"]].to_numpy()
    apart = [k for k in range(len(rc)) if (np.abs(rc - rc[k]).max(axis=1) <= 2).sum() == 1]
    marks = marks.iloc[apart]  # no other mark within two bins, so neighbours stay clean
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    radius = 0.3 * 8 / 0.2738  # 0.3 bin
    for _, m in marks.iterrows():
        r, c = m.pxl_row_in_fullres, m.pxl_col_in_fullres
        y0, y1, x0, x1 = int(r - 12), int(r + 13), int(c - 12), int(c + 13)
        disc = (yy[y0:y1, x0:x1] - r) ** 2 + (xx[y0:y1, x0:x1] - c) ** 2 <= radius**2
        image[y0:y1, x0:x1][disc] = (0, 255, 0)
    painted = tmp_path / "painted.tif"
    tifffile.imwrite(painted, image, photometric="rgb", rowsperstrip=64)  # striped, single level
    res = prepare_dataset(
        "painted",
        {sample: str(src)},
        {sample: str(painted)},
        workspace=tmp_path / "ws",
        show_progress=False,
        min_tissue=0.3,
    )
    p = xr.open_zarr(Workspace(tmp_path / "ws").dataset("painted").patches_path, group=sample).load()
    marked = {(int(m.array_row), int(m.array_col)) for _, m in marks.iterrows()}
    found = 0
    for img, (r0, c0) in zip(p.image.values, p.origin.values):
        green = (img[..., 1] > 180) & (img[..., 0] < 100) & (img[..., 2] < 100)
        labels, n = ndimage.label(green)
        for cy, cx in ndimage.center_of_mass(green, labels, range(1, n + 1)):
            size = (labels == labels[int(cy), int(cx)]).sum()
            if size < 30:  # ignore slivers cut by the patch edge
                continue
            bin_r, bin_c = r0 + (cy + 0.5) / 14 - 0.5, c0 + (cx + 0.5) / 14 - 0.5
            near = (round(bin_r), round(bin_c))
            assert near in marked
            assert abs(bin_r - near[0]) < 0.1 and abs(bin_c - near[1]) < 0.1  # within a tenth of a bin
            i, j = near[0] - r0, near[1] - c0
            token = green[14 * i : 14 * i + 14, 14 * j : 14 * j + 14]
            assert token.mean() > 0.2  # a 0.3-bin disc covers 28 % of its own token ...
            ring = green[max(14 * i - 14, 0) : 14 * i + 28, max(14 * j - 14, 0) : 14 * j + 28]
            assert token.sum() > 0.9 * ring.sum()  # ... and nearly none of its neighbours'
            found += 1
    assert found >= 10, f"only {found} marker bins landed in prepared patches"
    assert res.patches[sample] == len(p.patch)


def test_patch_origins_threshold_and_stride():
    tissue = np.zeros((100, 90), bool)
    tissue[10:60, 0:50] = True
    o = patch_origins(tissue, 32, 0.5)
    assert {tuple(x) for x in o} == {(0, 0), (32, 0)}
    assert {tuple(x) for x in patch_origins(tissue, 16, 1.0)} == {(16, 0), (16, 16)}
    assert len(patch_origins(tissue, 32, 0.0)) == 3 * 2


def test_rerun_is_a_no_op_and_changes_are_refused(prepared, synth_dir):
    ws, _ = prepared
    w = Workspace(ws)
    before = w.dataset("tiny").meta_path.stat().st_mtime_ns
    samples = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}
    again = prepare_dataset("tiny", samples, workspace=ws, show_progress=False)
    assert again.up_to_date and w.dataset("tiny").meta_path.stat().st_mtime_ns == before
    with pytest.raises(FeatcacheError, match="--overwrite"):
        prepare_dataset("tiny", samples, workspace=ws, stride=16, show_progress=False)
    assert w.dataset("tiny").meta_path.stat().st_mtime_ns == before
    assert not [p for p in (ws / "datasets").iterdir() if p.name.startswith(".")]
