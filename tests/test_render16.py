"""The 16 px per bin rendering (``image_16px``): drawn from the slide, added to a dataset staged, read by patch-16
encoders (docs/design.md §2, §7). The marker test at 16 px is in tests/test_prepare.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import xarray as xr
from conftest import BIN8, clone_sample
from PIL import Image
from typer.testing import CliRunner

from featcache.encoders import GridEncoder, get_spec
from featcache.errors import FeatcacheError
from featcache.extract import ExtractionConfig, extract
from featcache.geometry import PatchGeometry, geometry_for, parse_renderings
from featcache.prepare import prepare_dataset
from featcache.slide import Slide, render_patch
from featcache.stores import FeatureStore, Workspace
from featcache.visium import open_sample
from featcache.weights import load_encoder, resolve_weights
from pipeline.cli import featcache_app as app
from pipeline.predict import PredictOptions

VIT16 = ExtractionConfig("tiny-vit16", "random:0", chunk_patches=2)


def test_geometry_is_parametric_and_the_renderings_are_parsed():
    g = PatchGeometry(px_per_bin=16)
    assert (g.patch_px, g.um_per_px, g.bins) == (512, 0.5, 32)
    assert geometry_for(14).patch_px == 448 and get_spec("tiny-vit16").input_px == 512
    assert (
        get_spec("tiny-vit").px_per_bin == get_spec("densenet121").px_per_bin == get_spec("tiny-cnn").px_per_bin == 14
    )
    assert parse_renderings("14,16") == parse_renderings("16") == parse_renderings([16, 14]) == (14, 16)
    assert parse_renderings("14") == (14,)
    with pytest.raises(FeatcacheError, match="14 or 16"):
        parse_renderings("15")
    with pytest.raises(FeatcacheError, match="--px-per-bin"):
        parse_renderings("14,x")


def files_of(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_16px_encoder_is_refused_without_image_16px_and_reads_it_once_added(synth_dir, tmp_path):
    """Extract of a patch-16 encoder on a 14 px dataset is refused with the command that adds the rendering; that
    command adds image_16px alone (targets, image and fingerprint unchanged, a 14 px store still valid), and the
    stored tokens are then the encoder's own on the 512 px patches, 32 × 32 of them."""
    ws = tmp_path / "ws"
    runner = CliRunner()
    args = ["prepare", "--dataset", "one", "--sample", f"P1={synth_dir / 'P1'}", "--workspace", str(ws)]
    assert runner.invoke(app, args).exit_code == 0
    ds = Workspace(ws).open_dataset("one")
    assert ds.renderings == [14] and not (ds.patches_path / "P1" / "image_16px").exists()
    before = {k: v for k, v in files_of(ds.path).items() if not k.startswith("patches.zarr/zarr.json")}
    meta_before = json.loads(ds.meta_path.read_text())
    extract("one", ExtractionConfig("tiny-vit", "random:0"), workspace=ws, show_progress=False)  # a 14 px store

    res = runner.invoke(
        app, ["extract", "--dataset", "one", "--encoder", "tiny-vit16", "--weights", "random", "--workspace", str(ws)]
    )
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "no 16 px per bin rendering" in text and "image_16px" in text
    command = text.split("Add it with `", 1)[1].split("`", 1)[0]
    assert command.startswith("featcache prepare --dataset one") and command.endswith("--px-per-bin 14,16")
    with pytest.raises(FeatcacheError, match=r"featcache prepare .*--px-per-bin 14,16"):
        extract("one", VIT16, workspace=ws, show_progress=False)
    assert not Workspace(ws).feature_store("one", "tiny-vit16", random=True).exists()

    res = runner.invoke(app, command.split()[1:])  # the very command the message names
    assert res.exit_code == 0, res.output
    assert "added the 16 px per bin rendering" in " ".join(res.output.split())
    ds = Workspace(ws).open_dataset("one")
    meta = json.loads(ds.meta_path.read_text())
    assert ds.renderings == [14, 16] and meta["fingerprint"] == meta_before["fingerprint"]
    assert [r["array"] for r in meta["renderings"]] == ["image", "image_16px"]
    assert meta_before["renderings"] == meta["renderings"][:1]
    assert {k: v for k, v in meta.items() if k != "renderings"} == {
        k: v for k, v in meta_before.items() if k != "renderings"
    }
    after = files_of(ds.path)
    assert all(after[k] == v for k, v in before.items() if k != "dataset.json")  # nothing else was touched
    assert not [p for p in (ws / "datasets").iterdir() if p.name.startswith(".")]
    assert runner.invoke(app, command.split()[1:]).exit_code == 0  # now up to date
    assert "up to date" in runner.invoke(app, command.split()[1:]).output
    assert ds.verify() == []

    again = extract("one", ExtractionConfig("tiny-vit", "random:0"), workspace=ws, show_progress=False)
    assert again.patches_done == 0 and again.complete  # the 14 px store is still this dataset's
    out = extract("one", VIT16, workspace=ws, show_progress=False, batch_size=4)
    assert out.complete and out.patches_total == ds.n_patches("P1")
    store = FeatureStore(out.store)
    ident = store.identity
    assert ident["geometry"]["px_per_bin"] == 16 and ident["geometry"]["patch_px"] == 512
    assert ident["input_px"] == 512 and ident["grid"] == [32, 32] and ident["dataset_fingerprint"] == ds.fingerprint
    assert FeatureStore(again.store).identity["geometry"]["px_per_bin"] == 14
    spec = get_spec("tiny-vit16")
    enc = GridEncoder(spec, load_encoder(spec, resolve_weights(spec, "random:0"))[0]).eval()
    images = ds.images("P1", 16)
    assert images.dims == ("patch", "y", "x", "rgb") and images.shape[1:] == (512, 512, 3)
    with torch.inference_mode():
        tokens, _ = enc(torch.from_numpy(images.values))
    stored = store.tokens("P1", ("patch", "row", "col", "channel")).values
    assert stored.shape[1:] == (32, 32, 48) and np.array_equal(stored, tokens.numpy().astype(np.float16))
    assert np.array_equal(ds.patches("P1", 16).origin.values, ds.patches("P1").origin.values)

    import analysis

    assert analysis.open_patches("one", "P1", 16, workspace=ws).image_16px.shape == images.shape

    # verify and extract know the new array: a lost chunk file is named
    shutil.rmtree(ds.patches_path / "P1" / "image_16px" / "c")
    assert any("image_16px: chunk file" in p for p in ds.verify())
    with pytest.raises(FeatcacheError, match="image_16px lacks chunk file"):
        extract("one", VIT16, workspace=ws, show_progress=False, overwrite=True)


@pytest.fixture(scope="module")
def both(synth_dir, tmp_path_factory):
    """P1 and P2 (rotated and flipped) prepared at 14 and 16 px per bin in one go."""
    ws = tmp_path_factory.mktemp("render16-both")
    samples = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}
    prepare_dataset("both", samples, workspace=ws, show_progress=False, px_per_bin="14,16")
    return Workspace(ws).open_dataset("both")


def test_image_16px_is_rendered_from_the_slide_not_resized_from_the_448px_one(both, synth_dir):
    s = open_sample("P2", synth_dir / "P2")
    _, _, origins = s.plan_patches(32, 0.5)
    stored16 = both.images("P2", 16).values
    stored14 = both.images("P2").values
    assert np.array_equal(both.origins("P2"), origins) and stored16.shape == (len(origins), 512, 512, 3)
    with Slide(s.image_path) as slide:
        direct = np.stack(
            [render_patch(slide, s.registration.map_for(r, c), r, c, geometry_for(16)) for r, c in origins]
        )
    diff = np.abs(stored16.astype(np.int16) - direct)
    assert diff.max() <= 1 and diff.mean() < 0.01  # the 16 px rendering of the slide, to interpolation rounding
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(stored14).permute(0, 3, 1, 2).float(), size=(512, 512), mode="bilinear", antialias=True
    )
    resized = resized.round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    off = np.abs(resized - direct)
    assert off.mean() > 1.5 and off.max() > 20  # a resized 448 px patch is another, blurrier image
    assert stored16.std() > 0.98 * direct.std() and resized.std() < stored16.std()


def test_a_fresh_dataset_holds_both_renderings_staged_and_verified(both):
    meta = both.meta
    assert both.renderings == [14, 16]
    assert meta["renderings"][1] == {"px_per_bin": 16, "patch_px": 512, "um_per_px": 0.5, "array": "image_16px"}
    arr = both.image_array("P2", 16)
    assert arr.shape[1:] == (512, 512, 3) and arr.chunks == (8, 512, 512, 3) and arr.dtype == np.uint8
    p = xr.open_zarr(both.patches_path, group="P2", consolidated=False, drop_variables=["image"])
    assert p.image_16px.dims == ("patch", "y", "x", "rgb")
    assert both.verify() == [] and both.summary()["px_per_bin"] == [14, 16]
    with pytest.raises(FeatcacheError, match="featcache renders patches at 14 or 16"):
        both.patches("P2", 15)


def test_an_interrupted_addition_leaves_the_dataset_as_it_was(synth_dir, tmp_path, monkeypatch):
    import featcache.prepare as prep

    ws = tmp_path / "ws"
    samples = {"P1": str(synth_dir / "P1")}
    prepare_dataset("one", samples, workspace=ws, show_progress=False)
    ds = Workspace(ws).open_dataset("one")
    before = files_of(ds.path)
    real, calls = prep.render_patch, []

    def failing(slide, bin_map, r0, c0, geom):
        calls.append(geom.px_per_bin)
        if len(calls) > 2:
            raise OSError("disk full")
        return real(slide, bin_map, r0, c0, geom)

    monkeypatch.setattr(prep, "render_patch", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset("one", samples, workspace=ws, show_progress=False, px_per_bin="14,16")
    assert set(calls) == {16}  # only the missing rendering is rendered
    assert files_of(ds.path) == before and not [p for p in (ws / "datasets").iterdir() if p.name.startswith(".")]
    assert Workspace(ws).open_dataset("one").renderings == [14]

    # an array left in place by a commit killed before dataset.json listed it is never read, and is replaced
    monkeypatch.setattr(prep, "render_patch", real)
    shutil.copytree(ds.patches_path / "P1" / "image", ds.patches_path / "P1" / "image_16px")
    with pytest.raises(FeatcacheError, match="--px-per-bin 14,16"):
        Workspace(ws).open_dataset("one").image_array("P1", 16)
    res = prepare_dataset("one", samples, workspace=ws, show_progress=False, px_per_bin="16")
    assert res.added == [16] and res.renderings == [14, 16]
    ds = Workspace(ws).open_dataset("one")
    assert ds.image_array("P1", 16).shape[1:] == (512, 512, 3) and ds.verify() == []


def test_the_image_must_be_fine_enough_for_the_finest_rendering_asked_for(synth_dir, tmp_path):
    """12 native px per bin: enough for 14 px per bin (≥ 11.2), too coarse for 16 (≥ 12.8)."""
    p1 = clone_sample(synth_dir / "P1", tmp_path / "P1")
    spatial = p1 / BIN8 / "spatial"
    k = 12 / (8 / 0.2738)
    pos = pd.read_parquet(spatial / "tissue_positions.parquet")
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] *= k
    pos.to_parquet(spatial / "tissue_positions.parquet")
    sf = json.loads((spatial / "scalefactors_json.json").read_text())
    sf.update(microns_per_pixel=sf["microns_per_pixel"] / k, spot_diameter_fullres=sf["spot_diameter_fullres"] * k)
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    img = tifffile.imread(synth_dir / "P1" / "P1_tissue_image.btf")
    path = tmp_path / "coarse.tif"
    tifffile.imwrite(path, np.asarray(Image.fromarray(img).resize((int(img.shape[1] * k), int(img.shape[0] * k)))))
    assert open_sample("P1", p1, path, counts=False).registration.px_per_bin == pytest.approx(12, rel=0.01)
    with pytest.raises(FeatcacheError, match=r"rendering 16 px per bin would upsample .*--px-per-bin"):
        open_sample("P1", p1, path, counts=False, px_per_bin=16)
    with pytest.raises(FeatcacheError, match="at least 12.8 px per 8 µm bin"):
        prepare_dataset("c", {"P1": str(p1)}, {"P1": str(path)}, workspace=tmp_path / "ws", px_per_bin="14,16")


def test_predict_renders_a_new_slide_at_the_encoders_px_per_bin(synth_dir):
    """The virtual lattice's resolution check uses the run's encoder's pixels per bin."""
    from pipeline.predict import virtual_lattice

    with Slide(synth_dir / "P1" / "P1_tissue_image.btf") as slide:
        lattice, _ = virtual_lattice("P1", slide, 0.65, 32, 0.01, 14)  # 12.3 px per bin: enough for 14 ...
        assert len(lattice.origins)
        with pytest.raises(FeatcacheError, match="rendering 16 px per bin .* needs at least 12.8"):
            virtual_lattice("P1", slide, 0.65, 32, 0.01, 16)  # ... not for 16


def test_a_patch_16_encoder_fine_tunes_on_image_16px_and_predicts_a_slide_at_16_px(both, prepared, synth_dir, tmp_path):
    """Fine-tuning reads the encoder's rendering (refused, naming the command, without it); `featcache predict`
    renders the new slide at the run's 16 px per bin and reproduces the run's own test predictions."""
    from conftest import run_fold

    from pipeline.predict import predict
    from train.data import FoldInputs

    with pytest.raises(FeatcacheError, match="which fine-tuning reads.*--px-per-bin 14,16"):
        FoldInputs(Workspace(prepared[0]).open_dataset("tiny"), None, px_per_bin=16)  # the session's 14 px dataset
    assert FoldInputs(both, None, px_per_bin=16).arrays["P1"].tokens.shape[1:] == (512, 512, 3)
    ws = both.path.parent.parent
    ft = dict(mode="finetune", weights="random:0", decoder="linear", epochs=1, batch_size=4, micro_batch=2)
    res = run_fold("both", "tiny-vit16", "P2", workspace=ws, **ft)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["patching"]["px_per_bin"] == 16 and cfg["features"]["identity"]["source"] == "patches.zarr/image_16px"
    out = tmp_path / "pred"
    pos = str(synth_dir / "P2")
    p = predict(
        res.run_dir,
        synth_dir / "P2" / "P2_tissue_image.btf",
        PredictOptions(positions=pos),
        workspace=ws,
        output=out,
        device="cpu",
        show_progress=False,
    )
    mine = xr.open_zarr(out / "predictions.zarr")
    theirs = xr.open_zarr(res.run_dir / "predictions.zarr")
    assert p.patches == len(theirs.patch) and np.array_equal(mine.origin.values, theirs.origin.values)
    z, pred = mine.z.values.astype(np.float32), theirs.pred.values
    assert np.allclose(z, pred, atol=2e-3 * np.abs(pred).max() + 1e-3)  # the same pixels went in
    assert json.loads((out / "prediction.json").read_text())["rendering"]["patch_px"] == 512
