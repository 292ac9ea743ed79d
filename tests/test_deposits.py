"""Real Space Ranger deposits: compressed images and other containers, projective registration, non-gene
features, mixed feature sets, missing microns_per_pixel, several sections per patient, Space Ranger 4, and
the readers the ecosystem uses (scanpy, spatialdata-io) on our synthetic deposits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
from conftest import BIN8, run_fold
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from featcache.prepare import prepare_dataset
from featcache.stores import Workspace
from featcache.synth import SynthConfig, synthesize
from pipeline.cli import featcache_app as app

TINY = SynthConfig(rows=48, cols=64, n_genes=90, seed=11)


def prepare(ws, samples: dict, **kw):
    return prepare_dataset("d", {k: str(v) for k, v in samples.items()}, workspace=ws, show_progress=False, **kw)


def meta(ws) -> dict:
    return json.loads((ws / "datasets" / "d" / "dataset.json").read_text())


def patches(ws, sample: str) -> np.ndarray:
    return xr.open_zarr(ws / "datasets" / "d" / "patches.zarr", group=sample).image.values


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One small sample, and the patches prepared from its image as one uncompressed level (the other
    containers below hold one level too, so rendering takes the same path)."""
    out = tmp_path_factory.mktemp("base")
    synthesize(out, ["B"], TINY)
    plain = out / "plain.tif"
    tifffile.imwrite(plain, tifffile.imread(out / "B" / "B_tissue_image.btf"), photometric="rgb", tile=(256, 256))
    ws = tmp_path_factory.mktemp("base-ws")
    prepare(ws, {"B": out / "B"}, images={"B": str(plain)}, min_tissue=0.3)
    return out / "B", patches(ws, "B")


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "container",
    [
        "jpeg-tiled BigTIFF",
        "lzw-striped TIFF",
        "jpeg2000-tiled TIFF",
        "OME-TIFF",
        "plain JPEG",
        "plain PNG",
        "16-bit TIFF",
    ],
)
def test_every_container_and_codec_gives_the_same_patches(base, tmp_path, container):
    sample, reference = base
    img = tifffile.imread(sample / "B_tissue_image.btf")
    path = tmp_path / {"plain JPEG": "img.jpg", "plain PNG": "img.png", "OME-TIFF": "img.ome.tif"}.get(
        container, "img.tif"
    )
    if container == "jpeg-tiled BigTIFF":
        tifffile.imwrite(
            path,
            img,
            bigtiff=True,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 95},
        )
    elif container == "lzw-striped TIFF":
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=32, compression="lzw")
    elif container == "jpeg2000-tiled TIFF":
        tifffile.imwrite(
            path, img, tile=(256, 256), photometric="rgb", compression="jpeg2000", compressionargs={"level": 0}
        )  # level 0: lossless
    elif container == "OME-TIFF":
        tifffile.imwrite(
            path,
            img,
            ome=True,
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            metadata={"PhysicalSizeX": 0.2738, "PhysicalSizeY": 0.2738, "axes": "YXS"},
        )
    elif container == "16-bit TIFF":
        tifffile.imwrite(path, img.astype(np.uint16) * 257, photometric="rgb", tile=(256, 256))
    else:
        Image.fromarray(img).save(path, quality=95)
    ws = tmp_path / "ws"
    res = prepare(ws, {"B": sample}, images={"B": str(path)}, min_tissue=0.3)
    got = patches(ws, "B")
    assert got.shape == reference.shape and res.patches["B"] == len(reference)
    diff = np.abs(got.astype(int) - reference.astype(int)).mean()
    assert diff < (2.0 if "JPEG" in container or "jpeg-" in container else 1e-9), diff
    info = meta(ws)["samples"]["B"]["image_info"]
    assert info["compression"] != "" and info["path"] == str(path)
    if container == "16-bit TIFF":
        assert any("16-bit" in n for n in meta(ws)["notes"])


def test_image_found_when_the_sample_is_the_bin_folder(base, tmp_path):
    sample, reference = base
    res = prepare(tmp_path / "ws", {"B": sample / BIN8}, min_tissue=0.3)
    assert res.patches["B"] == len(reference)
    assert meta(tmp_path / "ws")["samples"]["B"]["image"] == str(sample / "B_tissue_image.btf")


# --------------------------------------------------------------------------- registration
def marker_offsets(sample, name: str, ws) -> list[float]:
    """Paint green discs on in-tissue bin centres of the image; after prepare, how far (in bins) each lands
    from its bin's token centre."""
    pos = pd.read_parquet(sample / BIN8 / "spatial" / "tissue_positions.parquet")
    image = tifffile.imread(next(sample.glob("*_tissue_image.*")))
    rng = np.random.default_rng(1)
    tissue = pos[(pos.in_tissue == 1) & (pos.array_row % 3 == 1) & (pos.array_col % 3 == 1)]
    marks = tissue.iloc[rng.choice(len(tissue), min(80, len(tissue)), replace=False)]
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    for _, m in marks.iterrows():
        r, c = m.pxl_row_in_fullres, m.pxl_col_in_fullres
        y0, x0 = int(r) - 12, int(c) - 12
        disc = (yy[y0 : y0 + 25, x0 : x0 + 25] - r) ** 2 + (xx[y0 : y0 + 25, x0 : x0 + 25] - c) ** 2 <= 8.8**2
        image[y0 : y0 + 25, x0 : x0 + 25][disc] = (0, 255, 0)
    painted = ws.parent / f"{name}-painted.tif"
    tifffile.imwrite(painted, image, photometric="rgb", tile=(256, 256))
    prepare_dataset(name, {"S": str(sample)}, {"S": str(painted)}, workspace=ws, show_progress=False, min_tissue=0.2)
    p = xr.open_zarr(ws / "datasets" / name / "patches.zarr", group="S").load()
    marked = {(int(m.array_row), int(m.array_col)) for _, m in marks.iterrows()}
    offsets = []
    for img, (r0, c0) in zip(p.image.values, p.origin.values):
        green = (img[..., 1] > 180) & (img[..., 0] < 100) & (img[..., 2] < 100)
        labels, n = ndimage.label(green)
        for k in range(1, n + 1):
            if (labels == k).sum() < 30:
                continue
            cy, cx = ndimage.center_of_mass(labels == k)
            br, bc = r0 + (cy + 0.5) / 14 - 0.5, c0 + (cx + 0.5) / 14 - 0.5
            assert (round(br), round(bc)) in marked
            offsets.append(float(np.hypot(br - round(br), bc - round(bc))))
    return offsets


def test_markers_land_on_their_tokens_under_projective_registration(tmp_path):
    synthesize(tmp_path, ["Q"], SynthConfig(**{**TINY.__dict__, "perspective": 0.08}))
    ws = tmp_path / "ws"
    offsets = marker_offsets(tmp_path / "Q", "proj", ws)
    assert len(offsets) >= 15 and max(offsets) < 0.1, offsets
    reg = json.loads((ws / "datasets" / "proj" / "dataset.json").read_text())["samples"]["S"]["registration"]
    assert reg["map"] == "sample-wide homography" and reg["residual_bins_of_map_used"] < 0.02
    assert reg["global_affine_residual_bins"] > 0.3  # an affine map would be off by a third of a bin or more
    assert reg["flipped"] in (True, False) and isinstance(reg["rotation_deg"], float)


def test_locally_projective_registration_gets_a_map_per_patch(base, tmp_path):
    sample, _ = base
    copy = shutil.copytree(sample, tmp_path / "W")
    path = copy / BIN8 / "spatial" / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    pitch = 8 / 0.2738
    pos["pxl_row_in_fullres"] += 0.3 * pitch * np.sin(pos.array_col / 50.0)  # a smooth, non-projective warp
    pos.to_parquet(path)
    prepare(tmp_path / "ws", {"W": copy}, images={"W": str(next(copy.glob("*.btf")))}, min_tissue=0.3)
    reg = meta(tmp_path / "ws")["samples"]["W"]["registration"]
    assert reg["map"] == "per-patch homography"
    assert reg["global_homography_residual_bins"] > 0.02 >= reg["residual_bins_of_map_used"]


# --------------------------------------------------------------------------- features and panels
def test_only_gene_expression_features_are_targets(tmp_path):
    import scanpy as sc

    synthesize(tmp_path, ["A"], SynthConfig(**{**TINY.__dict__, "antibody_features": 4}))
    ws = tmp_path / "ws"
    prepare(ws, {"A": tmp_path / "A"}, min_tissue=0.3)
    m = meta(ws)
    assert m["samples"]["A"]["feature_types"] == {"Antibody Capture": 4, "Gene Expression": 90}
    assert not any(g.startswith("ADT") for g in m["genes"]["ids"])
    gex = sc.read_10x_h5(tmp_path / "A" / BIN8 / "filtered_feature_bc_matrix.h5", gex_only=True)
    assert gex.n_vars == 90
    t = xr.open_zarr(ws / "datasets" / "d" / "targets.zarr", group="A").load()
    pos = pd.read_parquet(tmp_path / "A" / BIN8 / "spatial" / "tissue_positions.parquet").set_index("barcode")
    row_of = {b: i for i, b in enumerate(gex.obs_names)}
    lib = np.asarray(gex.X.sum(axis=1)).ravel()
    dense = gex.X.toarray()
    cols = [list(gex.var["gene_ids"]).index(g) for g in t.gene_id.values]
    grid = {(int(r), int(c)): b for b, r, c in zip(pos.index, pos.array_row, pos.array_col)}
    for k, (r0, c0) in enumerate(t.origin.values):
        for i, j in zip(*np.nonzero(t.mask.values[k])):
            b = row_of[grid[(r0 + i, c0 + j)]]
            assert t.library_size.values[k, i, j] == lib[b]  # Gene Expression UMIs only
            assert np.array_equal(t.counts.values[k, :, i, j], dense[b, cols])


def test_panel_is_chosen_among_genes_every_sample_has(tmp_path):
    synthesize(tmp_path, ["F", "G"], TINY, per_sample={"G": {"missing_genes": 5}})
    ws = tmp_path / "ws"
    r = CliRunner().invoke(
        app,
        [
            "prepare",
            "--dataset",
            "d",
            "--sample",
            f"F={tmp_path / 'F'}",
            "--sample",
            f"G={tmp_path / 'G'}",
            "--min-tissue",
            "0.3",
            "--genes",
            "top-mean:80",
            "--workspace",
            str(ws),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "5 Gene Expression feature(s) are missing from some samples" in r.output
    m = meta(ws)
    lacking = m["genes"]["not_in_every_sample"]
    assert len(lacking) == 5 and all(v == ["G"] for v in lacking.values())
    assert not set(lacking) & set(m["genes"]["ids"]) and len(m["genes"]["ids"]) == 80


def test_microns_per_pixel_derived_when_missing_and_space_ranger_4(tmp_path):
    synthesize(tmp_path, ["M"], SynthConfig(**{**TINY.__dict__, "write_mpp": False, "spaceranger": "4.0.1"}))
    assert (tmp_path / "M" / "outs" / "segmented_outputs").is_dir()
    ws = tmp_path / "ws"
    prepare(ws, {"M": tmp_path / "M"}, min_tissue=0.3)
    s = meta(ws)["samples"]["M"]
    assert s["microns_per_pixel_source"] == "derived: bin_size_um / spot_diameter_fullres"
    assert s["microns_per_pixel"] == pytest.approx(0.2738)
    assert s["space_ranger"].startswith("spaceranger-4.0.1")


# --------------------------------------------------------------------------- patients
def test_a_fold_keeps_a_patients_sections_together(tmp_path):
    from featcache.extract import ExtractionConfig, extract

    r = CliRunner().invoke(
        app,
        [
            "synth",
            str(tmp_path / "raw"),
            "--samples",
            "A,B",
            "--sections",
            "2",
            "--rows",
            "48",
            "--cols",
            "64",
            "--genes",
            "70",
            "--seed",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    ws = tmp_path / "ws"
    r = CliRunner().invoke(
        app,
        [
            "prepare",
            "--dataset",
            "d",
            "--manifest",
            str(tmp_path / "raw" / "manifest.csv"),
            "--min-tissue",
            "0.3",
            "--workspace",
            str(ws),
        ],
    )
    assert r.exit_code == 0, r.output
    assert meta(ws)["patients"] == {"A": ["A-s1", "A-s2"], "B": ["B-s1", "B-s2"]}
    extract("d", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    res = run_fold("d", "tiny-cnn", "A", mode="random", decoder="linear", epochs=1, batch_size=4, workspace=ws)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["train_samples"] == ["B-s1", "B-s2"] and cfg["test_samples"] == ["A-s1", "A-s2"]
    assert res.run_dir.name == "fold-A" and res.metrics["test_samples"] == ["A-s1", "A-s2"]
    pred = xr.open_zarr(res.run_dir / "predictions.zarr")
    assert set(pred["sample"].values) == {"A-s1", "A-s2"}
    n = sum(Workspace(ws).open_dataset("d").n_patches(s) for s in ("A-s1", "A-s2"))
    assert pred.sizes["patch"] == n == res.metrics["n_patches"]


# --------------------------------------------------------------------------- the ecosystem's readers
def test_scverse_readers_open_a_synthetic_sample(base):
    import scanpy as sc
    import spatialdata_io

    sample, _ = base
    sdata = spatialdata_io.visium_hd(
        sample / "outs", bin_size=8, fullres_image_file=sample / "B_tissue_image.btf", load_segmentations_only=False
    )
    table = next(iter(sdata.tables.values()))
    adata = sc.read_10x_h5(sample / BIN8 / "filtered_feature_bc_matrix.h5")
    assert table.n_obs == adata.n_obs and table.n_vars == adata.n_vars
    pos = pd.read_parquet(sample / BIN8 / "spatial" / "tissue_positions.parquet").set_index("barcode")
    xy = pos.loc[table.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    assert np.allclose(table.obsm["spatial"], xy)
    assert any(k.endswith("_full_image") for k in sdata.images)
