"""Intermediate layers (`extract --layers`, `train decoder --layer`), encoder plugins (entry points) and the
`featcache encoders` table (issue #20, items 3-5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import run_fold
from typer.testing import CliRunner

from featcache.encoders import GridEncoder, Registry, check_layers, get_spec, parse_layers
from featcache.errors import FeatcacheError
from featcache.extract import ExtractionConfig, extract
from featcache.stores import FeatureStore, Workspace
from featcache.weights import encoder_overview, load_encoder, resolve_weights
from pipeline.cli import featcache_app, train_app

REPO = Path(__file__).resolve().parents[1]


def float16_close(stored: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to float16 rounding (half an ulp: 2^-11 relative, subnormals absolute) and fp32 noise."""
    d = np.abs(stored.astype(np.float64) - ref.astype(np.float64))
    bound = np.abs(ref) * 2.0**-11 + 1e-5
    assert (d <= bound).all(), float((d - bound).max())


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def layered(prepared, tmp_path_factory):
    """A workspace of its own (the session one holds layer-less stores of the same names): tiny-vit random:0 with
    both its blocks, and tiny-cnn random:0 with two stage outputs."""
    src, _ = prepared
    ws = tmp_path_factory.mktemp("layers-ws")
    shutil.copytree(src / "datasets", ws / "datasets")
    vit = extract(
        "tiny",
        ExtractionConfig("tiny-vit", "random:0", chunk_patches=2, layers=(2, 1)),
        workspace=ws,
        show_progress=False,
        batch_size=4,
    )
    cnn = extract("tiny", ExtractionConfig("tiny-cnn", "random:0", layers=(3, 5)), workspace=ws, show_progress=False)
    return ws, FeatureStore(vit.store), FeatureStore(cnn.store)


def _images(ws, sample: str) -> torch.Tensor:
    patches = xr.open_zarr(Workspace(ws).dataset("tiny").patches_path, group=sample)
    return torch.from_numpy(patches.image.values)


def test_stored_blocks_are_timms_block_outputs_and_tokens_the_final_norm_of_the_last(layered):
    ws, store, _ = layered
    ident = store.identity
    assert ident["layers"] == {
        "tokens_1": {"layer": 1, "grid": [32, 32], "dim": 48, "module": "blocks.0"},
        "tokens_2": {"layer": 2, "grid": [32, 32], "dim": 48, "module": "blocks.1"},
    }
    spec = get_spec("tiny-vit")
    model, _ = load_encoder(spec, resolve_weights(spec, "random:0"))
    enc = GridEncoder(spec, model).eval()
    for sample in ("P1", "P2"):
        feats = store.open_sample(sample)
        final = feats.tokens
        for name in ("tokens_1", "tokens_2"):  # same layout, dims, dtype and chunking as tokens
            arr = feats[name]
            assert arr.dims == final.dims and arr.dtype == np.float16 and arr.shape == final.shape
            assert arr.encoding["chunks"] == final.encoding["chunks"]
        with torch.inference_mode():
            x = enc._normalise(_images(ws, sample))
            # timm's own blocks, one by one (not through featcache's code path)
            h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            outs = []
            for blk in model.blocks:
                h = blk(h)
                outs.append(h)
            n_prefix = model.num_prefix_tokens  # 1 cls + 2 registers
            assert n_prefix == 3 and ident["prefix_tokens_dropped"] == 3
            # timm's forward_intermediates, as eva and TRIDENT call it
            inter = model.forward_intermediates(
                x, indices=[0, 1], norm=False, output_fmt="NCHW", intermediates_only=True
            )
            normed = model.norm(outs[-1])[:, n_prefix:].reshape(len(x), 32, 32, 48).numpy()
        for k, (blk_out, timm_grid) in enumerate(zip(outs, inter), 1):
            ref = blk_out[:, n_prefix:].reshape(len(x), 32, 32, 48).numpy()
            assert np.array_equal(ref, timm_grid.permute(0, 2, 3, 1).numpy())
            float16_close(store.tokens(sample, ("patch", "row", "col", "channel"), layer=k).values, ref)
        # tokens (the final grid) = the final norm of the last block's output; tokens_<depth> is before that norm
        stored_final = final.transpose("patch", "row", "col", "channel").values
        float16_close(stored_final, normed)
        assert not np.allclose(feats.tokens_2.values, final.values, atol=1e-2)


def test_a_layered_store_holds_the_same_final_tokens_and_pooled_as_a_plain_one(layered, tmp_path):
    ws, store, _ = layered
    plain = extract(
        "tiny",
        ExtractionConfig("tiny-vit", "random:0", chunk_patches=2),
        workspace=ws,
        output=str(tmp_path / "p.zarr"),
        show_progress=False,
        batch_size=4,
    )
    assert "layers" not in FeatureStore(plain.store).identity  # a store without layers keeps its old identity
    for sample in ("P1", "P2"):
        a, b = store.open_sample(sample), FeatureStore(plain.store).open_sample(sample)
        assert np.array_equal(a.tokens.values, b.tokens.values)
        assert np.array_equal(a.pooled.values, b.pooled.values)
    assert store.verify().ok


def test_cnn_stage_outputs_are_timms_feature_levels(layered):
    ws, _, store = layered
    layers = store.identity["layers"]
    assert layers["tokens_3"] == {"layer": 3, "grid": [56, 56], "dim": 48, "module": "layer2"}  # stride 8
    assert layers["tokens_5"] == {"layer": 5, "grid": [14, 14], "dim": 96, "module": "layer4"}  # the final stage
    spec = get_spec("tiny-cnn")
    model, _ = load_encoder(spec, resolve_weights(spec, "random:0"))
    enc = GridEncoder(spec, model).eval()
    with torch.inference_mode():
        x = enc._normalise(_images(ws, "P1"))
        inter = model.forward_intermediates(x, indices=[2, 4], norm=False, intermediates_only=True)
    feats = store.open_sample("P1")  # an earlier stage's own sizes have their own dimension names
    assert feats.tokens_3.dims == ("patch", "channel_3", "row_3", "col_3") and feats.tokens_3.shape[1:] == (48, 56, 56)
    assert feats.tokens_5.dims == feats.tokens.dims
    stage = store.tokens("P1", layer=3)
    assert stage.dims == ("patch", "channel", "row", "col")
    float16_close(stage.values, inter[0].numpy())
    float16_close(feats.tokens_5.values, inter[1].numpy())
    assert np.array_equal(feats.tokens_5.values, feats.tokens.values)  # the last stage is the final grid


def test_layer_numbers_are_checked_against_the_networks_depth(layered, tmp_path):
    ws, store, _ = layered
    assert parse_layers("24, 16,16") == (16, 24) and parse_layers(None) == ()
    for bad in ("0", "a", "1.5", "-1"):
        with pytest.raises(FeatcacheError, match="counted from 1"):
            parse_layers(bad)
    with pytest.raises(FeatcacheError, match="has 2 blocks: --layers 1 to 2") as info:
        check_layers(get_spec("tiny-vit"), (3,))
    assert "3 is out of range" in str(info.value)
    with pytest.raises(FeatcacheError, match=r"5 stage outputs: 1 act1 \(stride 2, 32 ch\)"):
        check_layers(get_spec("tiny-cnn"), (6,))
    with pytest.raises(FeatcacheError, match="24 blocks"):  # uni2h on the meta device: no weights needed
        check_layers(get_spec("uni2h"), (25,))
    # the command line: refused before anything is computed or written
    r = CliRunner().invoke(
        featcache_app,
        [*"extract --encoder tiny-vit --weights random --layers 3 --dataset tiny".split(), "--workspace", str(ws)]
        + ["--output", str(tmp_path / "x.zarr")],
    )
    assert r.exit_code == 2 and "has 2 blocks" in flat(r.output) and not (tmp_path / "x.zarr").exists()
    # resuming with other layers: the layers are the store's identity
    with pytest.raises(FeatcacheError) as info:
        extract("tiny", ExtractionConfig("tiny-vit", "random:0", chunk_patches=2, layers=(1,)), workspace=ws)
    msg = str(info.value)
    assert "holds intermediate layers 1, 2" in msg and "asks for intermediate layers 1" in msg and "--overwrite" in msg
    with pytest.raises(FeatcacheError, match="holds intermediate layers 1, 2, and this extraction asks for no"):
        extract("tiny", ExtractionConfig("tiny-vit", "random:0", chunk_patches=2), workspace=ws)
    # resuming with the same layers (in any order) is a no-op
    again = extract("tiny", ExtractionConfig("tiny-vit", "random:0", chunk_patches=2, layers=(1, 2)), workspace=ws)
    assert again.patches_done == 0 and again.complete


def test_train_decoder_on_a_layer_end_to_end_and_predict_computes_that_layer(layered):
    from train.model import load_run
    from train.summary import summarize

    ws, store, _ = layered
    runs = {
        fold: run_fold(
            "tiny", "tiny-vit", fold, mode="random", layer=1, decoder="linear", epochs=1, batch_size=4, workspace=ws
        )
        for fold in ("P1", "P2")
    }
    run_dir = runs["P2"].run_dir
    assert run_dir.parent.name == "random-layer1-linear" and run_dir.name == "fold-P2"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["layer"] == 1 and cfg["run"] == "random-layer1-linear"
    assert runs["P2"].metrics["run"] == "random-layer1-linear"
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["c_in"] == 48

    # the comparison file keys the run by encoder and run name, and says its layer
    comparison = summarize("tiny", ws)
    entry = comparison["results"]["tiny-vit_random-layer1-linear"]
    assert entry["layer"] == 1 and entry["default_protocol"] is False and entry["settings"]["layer"] == 1

    # predict's model turns pixels into the run's grid: tokens_1, then the decoder
    trained = load_run(run_dir)
    assert trained.model.encoder.layer == 1
    with torch.inference_mode():
        z = trained.model(_images(ws, "P2")).numpy()
    pred = xr.open_zarr(run_dir / "predictions.zarr").pred.values
    assert np.allclose(z, pred, atol=2e-3 * np.abs(pred).max() + 1e-3)


def test_layer_refusals_and_the_config_of_a_run_without_a_layer(layered, tiny_cnn_features):
    from train.config import TrainConfig

    ws, store, _ = layered
    with pytest.raises(FeatcacheError) as info:
        run_fold("tiny", "tiny-cnn", "P2", mode="random", layer=2, epochs=1, workspace=ws)
    msg = str(info.value)
    assert "has no layer 2 (tokens_2)" in msg and "holds intermediate layers 3, 5" in msg
    assert "featcache extract --dataset tiny --encoder tiny-cnn --weights random --layers 2,3,5 --overwrite" in msg
    plain_ws, _ = tiny_cnn_features  # the session's store was extracted without layers
    with pytest.raises(FeatcacheError, match="holds no intermediate layers"):
        run_fold("tiny", "tiny-cnn", "P2", mode="random", layer=1, epochs=1, workspace=plain_ws)
    with pytest.raises(FeatcacheError, match="fine-tuning"):
        TrainConfig("tiny", "tiny-vit", "P2", mode="finetune", layer=1).validate()
    with pytest.raises(FeatcacheError, match="counted from 1"):
        TrainConfig("tiny", "tiny-vit", "P2", layer=0).validate()
    r = CliRunner().invoke(
        train_app,
        [*"decoder --dataset tiny --encoder tiny-cnn --mode random --fold P2 --layer 4 --device cpu".split()]
        + ["--workspace", str(ws)],
    )
    assert r.exit_code == 2 and "--layers 3,4,5 --overwrite" in flat(r.output)
    # train loocv: the layer reaches every cached run; fine-tune runs train the final grid
    from train.loocv import loocv_configs

    cfgs = loocv_configs("tiny", ["tiny-vit"], ["random", "finetune"], ["P1", "P2"], {"layer": 2, "epochs": 1})
    assert {(c.mode, c.layer, c.run_name) for c in cfgs} == {
        ("random", 2, "random-layer2"),
        ("finetune", None, "finetune"),
    }
    # without --layer a run's config (and so its hash) is what it always was
    base = TrainConfig("tiny", "tiny-vit", "P2")
    assert "layer" not in base.record({}) and base.run_name == "frozen"
    assert base.but(layer=3).record({})["layer"] == 3 and base.but(layer=3).run_name == "frozen-layer3"
    assert base.but(layer=3).record({})["config_sha256"] != base.record({})["config_sha256"]


# --------------------------------------------------------------------------- encoders from other packages
PLUGIN = """
from featcache.encoders import EncoderSpec


def specs():
    return [
        EncoderSpec(
            name="plugin-vit",
            arch="vit_tiny_patch16_224",
            kind="vit",
            dim=32,
            grid=32,
            pooled="cls",
            params=0.05e6,
            kwargs=dict(img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, dynamic_img_size=True),
            licence="MIT",
            hf_repo="example/plugin-vit",
            note="a plugin's encoder",
        )
    ]
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A tiny package with a `featcache.encoders` entry point, installed with pip into a folder of its own."""
    root = tmp_path_factory.mktemp("layers-plugin")
    pkg = root / "src"
    (pkg / "fc_plugin_demo").mkdir(parents=True)
    (pkg / "fc_plugin_demo" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "fc-plugin-demo"
            version = "0.3.1"

            [tool.setuptools]
            packages = ["fc_plugin_demo"]

            [project.entry-points."featcache.encoders"]
            demo = "fc_plugin_demo:specs"
            """
        )
    )
    target = root / "site"
    subprocess.run(
        [sys.executable, *"-m pip install -q --no-deps --no-build-isolation --no-index".split()]
        + ["--target", str(target), str(pkg)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


def _featcache(plugin_dir: Path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO)]), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True, env=env)


def test_a_plugin_is_listed_with_its_source_and_extracts(plugin_dir, layered, tmp_path):
    ws, _, _ = layered
    # one interpreter for both listings: the table, then --json
    script = (
        "from typer.testing import CliRunner; from pipeline.cli import featcache_app as app; "
        "print(CliRunner().invoke(app, ['encoders']).output); print('@@'); "
        "print(CliRunner().invoke(app, ['encoders', '--json']).output)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    table, listed = r.stdout.split("@@")
    rows = {row["encoder"]: row for row in json.loads(listed)}
    mine = rows["plugin-vit"]
    assert mine["source"] == "fc-plugin-demo 0.3.1" and rows["uni2h"]["source"] == "built-in"
    shape = (mine["patch_size"], mine["px_per_bin"], mine["grid"], mine["dim"], mine["pooled_dim"])
    assert shape == (14, 14, "32×32", 32, 32)
    assert mine["licence"] == "MIT" and mine["hf_repo"] == "example/plugin-vit" and mine["weights_local"] is False
    assert "plugin-vit" in table and "0.3.1" in table, table
    out = tmp_path / "plugin.zarr"
    r = _featcache(
        plugin_dir,
        *"extract --encoder plugin-vit --weights random --dataset tiny --layers 3 --device cpu".split(),
        *("--workspace", str(ws), "--output", str(out)),
    )
    assert r.returncode == 0, r.stderr + r.stdout
    st = FeatureStore(out)
    assert st.status().complete and st.identity["encoder"] == "plugin-vit"
    assert st.open_sample("P1").tokens_3.shape[1:] == (32, 32, 32)


class FakeDist:
    name, version = "broken-pkg", "1.0"


class FakeEntryPoint:
    group = "featcache.encoders"
    dist = FakeDist()

    def __init__(self, name, obj):
        self.name, self.value, self.obj = name, f"broken_pkg:{name}", obj

    def load(self):
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


def _registry_with(monkeypatch, *eps) -> Registry:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: list(eps))
    reg = Registry()
    reg.add(get_spec("tiny-vit"))
    return reg


def test_broken_plugins_and_name_clashes_are_one_error_naming_the_package(monkeypatch):
    from dataclasses import replace

    tiny = get_spec("tiny-vit")
    cases = [
        (FakeEntryPoint("a", ImportError("no module named nope")), "failed to load (ImportError: no module"),
        (FakeEntryPoint("b", 42), "gave int, not an EncoderSpec"),
        (FakeEntryPoint("c", lambda: [tiny]), "registers 'tiny-vit', a name featcache already has (built-in)"),
        (FakeEntryPoint("d", replace(tiny, name="bad/name")), "is not a valid name"),
    ]
    for ep, needle in cases:
        reg = _registry_with(monkeypatch, ep)
        with pytest.raises(FeatcacheError) as info:
            list(reg)
        assert needle in str(info.value) and "broken-pkg 1.0" in str(info.value), str(info.value)
        with pytest.raises(FeatcacheError):  # still refused the next time: never half-loaded
            reg["tiny-vit"]
    twice = replace(tiny, name="twin")
    reg = _registry_with(monkeypatch, FakeEntryPoint("e", twice), FakeEntryPoint("f", twice))
    with pytest.raises(FeatcacheError, match="registered twice"):
        len(reg)
    # a good plugin: loaded once, on first reading, with its source
    reg = _registry_with(monkeypatch, FakeEntryPoint("g", replace(tiny, name="extra")))
    assert dict.__len__(reg) == 1 and "extra" in reg and reg.source("extra") == "broken-pkg 1.0"
    assert reg.source("tiny-vit") == "built-in"


def test_encoder_overview_has_every_column_of_the_table():
    rows = {r["encoder"]: r for r in encoder_overview()}
    uni = rows["uni2h"]
    shape = (uni["patch_size"], uni["px_per_bin"], uni["grid"], uni["dim"], uni["pooled_dim"])
    assert shape == (14, 14, "32×32", 1536, 1536)
    assert uni["hf_repo"] == "MahmoodLab/UNI2-h" and uni["source"] == "built-in" and "licence" in uni
    assert rows["virchow2"]["pooled_dim"] == 2560
    dn = rows["densenet121"]
    assert dn["patch_size"] is None and dn["stride"] == 32 and dn["grid"] == "14×14"
    for name, row in rows.items():  # the patch size the table shows is the network's own
        spec = get_spec(name)
        if spec.kind == "vit":
            from featcache.encoders import build_model

            assert tuple(build_model(spec, "meta").patch_embed.patch_size) == (row["patch_size"],) * 2
    r = CliRunner().invoke(featcache_app, ["encoders"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    for header in ("patch", "px/bin", "grid", "token", "pooled", "params", "licence", "hub", "weights", "source"):
        assert header in r.output
    assert "MahmoodLab/UNI2-h" in r.output and "stride 32" in r.output


def test_a_store_whose_pooled_width_differs_from_its_tokens_opens_in_xarray(layered, tmp_path, monkeypatch):
    """cls ⊕ mean (Virchow2's pooled output) is twice the token width: its dimension has its own name."""
    from dataclasses import replace

    from featcache.encoders import REGISTRY

    ws, _, _ = layered
    monkeypatch.setitem(
        REGISTRY, "tiny-vit-clsmean", replace(get_spec("tiny-vit"), name="tiny-vit-clsmean", pooled="cls+mean")
    )
    res = extract(
        "tiny",
        ExtractionConfig("tiny-vit-clsmean", "random:0", layers=(1,)),
        workspace=ws,
        output=str(tmp_path / "cm.zarr"),
        show_progress=False,
    )
    feats = FeatureStore(res.store).open_sample("P1")
    assert feats.pooled.dims == ("patch", "pooled_channel") and feats.pooled.shape[1] == 96
    assert feats.tokens.sizes["channel"] == 48 and feats.tokens_1.dims == feats.tokens.dims
