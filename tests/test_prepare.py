"""`featcache prepare`: the token <-> bin invariant, targets, stores, idempotence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import xarray as xr
from conftest import BIN8
from scipy import ndimage

from featcache.encoders import GridEncoder, build_model, get_spec
from featcache.errors import FeatcacheError
from featcache.geometry import geometry_for, image_array_name, patch_origins
from featcache.prepare import prepare_dataset
from featcache.slide import Slide, render_patch
from featcache.stores import Workspace
from featcache.synth import SynthConfig, synthesize
from featcache.visium import open_sample


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


PROJECTIVE = SynthConfig(rows=64, cols=64, n_genes=64, seed=5, perspective=0.08, rotation_deg=1.1, flip_rows=False)
ENCODER_AT = {14: "tiny-vit", 16: "tiny-vit16"}  # a patch-14 and a patch-16 ViT


def paint_dots(image: np.ndarray, marks: pd.DataFrame, bin_map) -> np.ndarray:
    """Green discs of 0.3 bin (the local bin pitch of ``bin_map``) on the bin centres of ``marks``."""
    image = image.copy()
    for _, m in marks.iterrows():
        r, c = m.pxl_row_in_fullres, m.pxl_col_in_fullres
        radius = 0.3 * bin_map.px_per_bin(m.array_row, m.array_col)
        y0, x0 = int(r - radius - 2), int(c - radius - 2)
        yy, xx = np.mgrid[y0 : int(r + radius + 3), x0 : int(c + radius + 3)]
        disc = (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
        image[yy[disc], xx[disc]] = (0, 255, 0)
    return image


@pytest.fixture(scope="module", params=["P1", "P2", "Q"], ids=["rotated", "rotated-flipped", "projective"])
def marked(request, synth_dir, tmp_path_factory):
    """Green dots painted on chosen bins of a sample's full-resolution slide, prepared at 14 and 16 px per bin; and
    the same patches rendered directly from the unpainted slide (to see which tokens the dots change).

    P1: the grid rotated (drawn per sample); P2: rotated -1.3° and flipped; Q: rotated 1.1° under a projective
    registration (the bin pitch changes by ± 8 % across the grid)."""
    sample, tmp = request.param, tmp_path_factory.mktemp(f"marked-{request.param}")
    if sample == "Q":
        synthesize(tmp, ["Q"], PROJECTIVE)
    src = (tmp if sample == "Q" else synth_dir) / sample
    pos = pd.read_parquet(src / BIN8 / "spatial" / "tissue_positions.parquet")
    rng = np.random.default_rng(0)
    tissue = pos[pos.in_tissue == 1]
    marks = tissue.iloc[rng.choice(len(tissue), 80, replace=False)]
    rc = marks[["array_row", "array_col"]].to_numpy()
    apart = [k for k in range(len(rc)) if (np.abs(rc - rc[k]).max(axis=1) <= 2).sum() == 1]
    marks = marks.iloc[apart]  # no other mark within two bins, so neighbours stay clean
    painted, unpainted = tmp / "painted.tif", tmp / "unpainted.tif"  # striped, single level, both
    full = tifffile.imread(src / f"{sample}_tissue_image.btf")
    bin_map = open_sample(sample, src).registration.global_map
    tifffile.imwrite(painted, paint_dots(full, marks, bin_map), photometric="rgb", rowsperstrip=64)
    tifffile.imwrite(unpainted, full, photometric="rgb", rowsperstrip=64)
    ws = tmp / "ws"
    res = prepare_dataset(
        "painted",
        {sample: str(src)},
        {sample: str(painted)},
        workspace=ws,
        show_progress=False,
        min_tissue=0.3,
        px_per_bin="14,16",
    )
    ds = Workspace(ws).open_dataset("painted")
    assert res.renderings == ds.renderings == [14, 16] and res.patches[sample] == ds.n_patches(sample) >= 3
    s = open_sample(sample, src, unpainted)  # the unpainted slide, cut and mapped as prepare did
    _, _, origins = s.plan_patches(32, 0.3)
    assert np.array_equal(origins, ds.origins(sample))
    with Slide(unpainted) as slide:
        clean = {
            p: np.stack([render_patch(slide, s.registration.map_for(r, c), r, c, geometry_for(p)) for r, c in origins])
            for p in (14, 16)
        }
    return ds, sample, {(int(m.array_row), int(m.array_col)) for _, m in marks.iterrows()}, clean


@pytest.mark.parametrize("px", [14, 16])
def test_a_dot_on_bin_ij_lands_on_pixel_block_ij_and_token_ij(marked, px):
    """Dots painted on bins of the full-resolution slide: in the rendering at ``px`` px per bin each dot is centred
    on its bin's px × px block (within a tenth of a bin) and fills it, and in the token grid of a ViT whose patch
    is ``px`` (no attention blocks, so a token sees only its own pixels) the dot changes token (i, j) alone."""
    ds, sample, marked_bins, clean = marked
    p = ds.patches(sample, px)
    images = p[image_array_name(px)].values
    assert images.shape[1:] == (32 * px, 32 * px, 3) and images.dtype == np.uint8
    spec = get_spec(ENCODER_AT[px])
    assert spec.px_per_bin == px and spec.input_px == 32 * px
    torch.manual_seed(0)
    enc = GridEncoder(spec, build_model(spec, depth=0)).eval()
    with torch.inference_mode():
        painted_tokens, _ = enc(torch.from_numpy(images))
        clean_tokens, _ = enc(torch.from_numpy(clean[px]))
    assert tuple(painted_tokens.shape[1:3]) == (32, 32)  # one token per bin
    change = (painted_tokens - clean_tokens).abs().amax(dim=-1).numpy()  # (patch, 32, 32)
    found = 0
    for k, (img, (r0, c0)) in enumerate(zip(images, p.origin.values)):
        green = (img[..., 1] > 180) & (img[..., 0] < 100) & (img[..., 2] < 100)
        labels, n = ndimage.label(green)
        for cy, cx in ndimage.center_of_mass(green, labels, range(1, n + 1)):
            if (labels == labels[int(cy), int(cx)]).sum() < 0.15 * px * px:  # slivers cut by the patch edge
                continue
            bin_r, bin_c = r0 + (cy + 0.5) / px - 0.5, c0 + (cx + 0.5) / px - 0.5
            near = (round(bin_r), round(bin_c))
            assert near in marked_bins
            assert abs(bin_r - near[0]) < 0.1 and abs(bin_c - near[1]) < 0.1  # within a tenth of a bin
            i, j = near[0] - r0, near[1] - c0
            block = green[px * i : px * i + px, px * j : px * j + px]
            assert block.mean() > 0.2  # a 0.3-bin disc covers 28 % of its own block ...
            ring = green[max(px * i - px, 0) : px * i + 2 * px, max(px * j - px, 0) : px * j + 2 * px]
            assert block.sum() > 0.9 * ring.sum()  # ... and nearly none of its neighbours'
            around = change[k, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            assert change[k, i, j] == around.max() > 0  # token (i, j) is the one the dot changes ...
            assert np.sort(around, axis=None)[-2] < 0.25 * change[k, i, j]  # ... the others next to it barely
            found += 1
        # and no token away from every dot changes at all
        inside = {(r - r0, c - c0) for r, c in marked_bins if -1 <= r - r0 <= 32 and -1 <= c - c0 <= 32}
        near_a_dot = np.zeros((34, 34), bool)
        for i, j in inside:
            near_a_dot[i : i + 3, j : j + 3] = True
        assert not (change[k] > 0)[~near_a_dot[1:33, 1:33]].any()
    assert found >= 10, f"only {found} marker bins landed in prepared patches"


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
