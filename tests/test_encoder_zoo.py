"""The eight encoders of issue #20: full-size shapes on the meta device, and for each one a checkpoint in its hub
repository's layout (file name and key names) loaded strictly through ``--weights FILE`` and compared with the
architecture's own forward.

Why reduced models keep the layout check valid: the ViTs are built with their registry entry's exact timm
architecture and keyword arguments (patch size, register tokens, SwiGLU packing, layer scale, qkv bias, MLP ratio,
normalisation, pooling), with only ``depth`` and ``embed_dim`` (heads kept, so the head width shrinks) overridden.
A checkpoint's key names and the way each tensor is laid out (qkv packing, the SwiGLU gate half, prefix tokens,
position embeddings) are the same in every block and do not depend on width, so one or two blocks of a narrow model
exercise every rule of the conversion and of strict loading; what width and depth change, the tensor shapes, is
checked at full size on the meta device (no memory) in ``test_full_size_on_meta_device``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

from featcache.encoders import REGISTRY, GridEncoder, build_model, get_spec
from featcache.errors import FeatcacheError
from featcache.extract import ExtractionConfig, extract
from featcache.stores import FeatureStore, Workspace
from featcache.weights import hub_filenames, load_encoder, resolve_weights

# name: (prefix tokens, pooled width, px per bin) at full size
NEW = {
    "resnet50": (0, 1024, 16),
    "uni": (1, 1024, 16),
    "conch15": (1, 1024, 16),
    "gigapath": (1, 1536, 16),
    "hoptimus1": (5, 1536, 14),
    "h0mini": (5, 1536, 14),
    "virchow": (1, 2560, 14),
    "midnight12k": (1, 3072, 14),
}
# Reduced width/depth per ViT (heads as the full model; SwiGLU hidden widths stay even).
REDUCED = {
    "uni": dict(depth=1, embed_dim=128),
    "conch15": dict(depth=1, embed_dim=128),
    "gigapath": dict(depth=1, embed_dim=192),
    "hoptimus1": dict(depth=1, embed_dim=192, num_heads=24),
    "h0mini": dict(depth=2, embed_dim=96),
    "virchow": dict(depth=1, embed_dim=160),
    "midnight12k": dict(depth=2, embed_dim=192, num_heads=24),
}
# The checkpoint file each hub repository holds.
HUB_FILE = {
    "resnet50": "model.safetensors",  # timm/resnet50.tv_in1k
    "uni": "pytorch_model.bin",
    "conch15": "pytorch_model_vision.bin",
    "gigapath": "pytorch_model.bin",
    "hoptimus1": "pytorch_model.bin",
    "h0mini": "model.safetensors",
    "virchow": "pytorch_model.bin",
    "midnight12k": "model.safetensors",  # a transformers Dinov2Model
}


def reduced_spec(name: str):
    spec = get_spec(name)
    if name not in REDUCED:
        return spec
    kw = {**spec.kwargs, **REDUCED[name]}
    return dataclasses.replace(spec, kwargs=kw, dim=kw["embed_dim"])


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and running statistic away from its init (layer scale 1e-5 would hide the blocks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model.eval()


# ---- the hub layouts, written from the hub side ----------------------------------------------------------------

# transformers' Dinov2Layer (use_swiglu_ffn=True): a block's keys as transformers names them.
HF_DINOV2_LAYER_KEYS = {
    "norm1.weight",
    "norm1.bias",
    "attention.attention.query.weight",
    "attention.attention.query.bias",
    "attention.attention.key.weight",
    "attention.attention.key.bias",
    "attention.attention.value.weight",
    "attention.attention.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "layer_scale1.lambda1",
    "norm2.weight",
    "norm2.bias",
    "mlp.weights_in.weight",
    "mlp.weights_in.bias",
    "mlp.weights_out.weight",
    "mlp.weights_out.bias",
    "layer_scale2.lambda1",
}
_TO_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.weights_in",
    "mlp.fc2": "mlp.weights_out",
}


def as_transformers_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 ViT's state dict as a transformers Dinov2Model saves it (qkv split into query, key, value)."""
    dim = state["cls_token"].shape[-1]
    out = {"embeddings.mask_token": torch.zeros(1, dim)}
    for k, v in state.items():
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.rsplit(".", 1)[1]] = v
        else:
            _, i, rest = k.split(".", 2)
            stem, leaf = rest.rsplit(".", 1) if not rest.endswith("gamma") else (rest, "")
            if stem == "attn.qkv":
                for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = t
            else:
                out[f"encoder.layer.{i}.{_TO_HF_BLOCK[stem]}" + (f".{leaf}" if leaf else "")] = v
    return {k: v.contiguous() for k, v in out.items()}


def hub_checkpoint(name: str, model: torch.nn.Module, folder) -> tuple:
    """(path, state as saved) of ``model`` in the layout of the encoder's hub repository."""
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    if name == "midnight12k":
        state = as_transformers_dinov2(state)
    elif name == "conch15":  # TRIDENT's CONCHVisionTower: trunk + the contrastive attentional pooler (768-d)
        state = {f"trunk.{k}": v for k, v in state.items()}
        state.update(
            {
                "attn_pool_contrast.query": torch.randn(1, 768, generator=g),
                "attn_pool_contrast.ln_k.weight": torch.ones(1024),
                "attn_pool_contrast.ln_k.bias": torch.zeros(1024),
                "attn_pool_contrast.ln_q.weight": torch.ones(768),
                "attn_pool_contrast.ln_q.bias": torch.zeros(768),
                "attn_pool_contrast.to_q.weight": torch.randn(768, 768, generator=g),
                "attn_pool_contrast.to_kv.weight": torch.randn(1536, 1024, generator=g),
                "attn_pool_contrast.to_out.weight": torch.randn(768, 768, generator=g),
                "ln_contrast.weight": torch.ones(768),
                "ln_contrast.bias": torch.zeros(768),
            }
        )
    path = folder / HUB_FILE[name]
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


def reference_vit(name: str, seed: int) -> torch.nn.Module:
    """The architecture itself (timm), random weights: what the checkpoint is made from and compared against."""
    spec = reduced_spec(name)
    torch.manual_seed(seed)
    return randomised(build_model(spec), seed)


def timm_forward(spec, model, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """timm's forward_features on the normalised pixels; prefix tokens dropped with the model's num_prefix_tokens."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = model.forward_features(x)
    n = model.num_prefix_tokens
    patch = out[:, n:]
    side = int(round(patch.shape[1] ** 0.5))
    tokens = patch.reshape(len(x), side, side, -1)
    pooled = out[:, 0] if spec.pooled == "cls" else torch.cat([out[:, 0], patch.mean(1)], dim=1)
    return tokens.numpy(), pooled.numpy()


def assert_fp16_close(stored: np.ndarray, ref: np.ndarray) -> float:
    """Stored float16 tokens equal the float32 reference up to float16 rounding (half an ulp, 2^-11 relative; one
    ulp allowed for the float32 arithmetic's own order-of-operations noise)."""
    d = np.abs(stored.astype(np.float32) - ref)
    assert np.all(d <= np.abs(ref) * 2.0**-10 + 1e-4), float(d.max())
    return float(d.max())


# ---- full size, no memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NEW))
def test_full_size_on_meta_device(name):
    spec = get_spec(name)
    prefix, pooled_dim, px = NEW[name]
    model = build_model(spec, "meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(spec.params, rel=0.005)
    assert spec.px_per_bin == px and spec.input_px == 32 * px and spec.grid == 32
    enc = GridEncoder(spec, model).to("meta")
    if spec.kind == "vit":
        assert enc.num_prefix_tokens == prefix
    tokens, pooled = enc(torch.empty(2, spec.input_px, spec.input_px, 3, dtype=torch.uint8, device="meta"))
    assert tuple(tokens.shape) == (2, 32, 32, spec.dim) and tuple(pooled.shape) == (2, pooled_dim)
    assert spec.pooled_dim == pooled_dim and spec.licence and spec.hf_repo and spec.note


def test_every_encoder_has_a_licence_and_hub_file_names():
    assert all(spec.licence for spec in REGISTRY.values())
    assert hub_filenames(get_spec("conch15"))[0] == "pytorch_model_vision.bin"
    assert hub_filenames(get_spec("uni")) == ("model.safetensors", "pytorch_model.bin")


# ---- patch-14 encoders: through the dataset extraction --------------------------------------------------------------


@pytest.mark.parametrize("name", ["hoptimus1", "h0mini", "virchow", "midnight12k"])
def test_extract_from_hub_checkpoint_equals_timm_forward(name, prepared, tmp_path, monkeypatch):
    ws, _ = prepared
    spec = reduced_spec(name)
    monkeypatch.setitem(REGISTRY, name, spec)  # extraction builds the reduced network from the same entry
    ref = reference_vit(name, seed=11)
    path, saved = hub_checkpoint(name, ref, tmp_path)
    if name == "midnight12k":  # the file really is in transformers' names
        assert {k.split(".", 3)[3] for k in saved if k.startswith("encoder.layer.")} == HF_DINOV2_LAYER_KEYS
        assert "blocks.0.attn.qkv.weight" not in saved
    out = tmp_path / "store.zarr"
    res = extract("tiny", ExtractionConfig(name, str(path)), workspace=ws, output=str(out), show_progress=False)
    assert res.complete
    worst = 0.0
    for sample in ("P1", "P2"):
        feats = xr.open_zarr(out, group=sample)
        images = xr.open_zarr(Workspace(ws).dataset("tiny").patches_path, group=sample).image.values
        assert images.shape[1:] == (spec.input_px, spec.input_px, 3)
        tokens, pooled = timm_forward(spec, ref, images)
        stored = feats.tokens.transpose("patch", "row", "col", "channel").values
        assert stored.dtype == np.float16 and stored.shape == tokens.shape
        worst = max(worst, assert_fp16_close(stored, tokens))
        np.testing.assert_allclose(feats.pooled.values, pooled, rtol=1e-4, atol=1e-4)
    assert worst > 0  # the comparison saw real values
    print(f"{name}: max |stored - timm| = {worst:.2e} over {res.patches_total} patches")


def test_midnight_conversion_is_sensitive_to_query_key_order(tmp_path):
    """Swapping query and key in the transformers checkpoint changes the tokens: the packing order is tested."""
    name = "midnight12k"
    spec = reduced_spec(name)
    ref = reference_vit(name, seed=3)
    _, state = hub_checkpoint(name, ref, tmp_path)
    swapped = dict(state)
    q, k = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.key.weight"
    swapped[q], swapped[k] = state[k], state[q]
    save_file(swapped, str(tmp_path / "swapped.safetensors"))
    model, _ = load_encoder(spec, resolve_weights(spec, str(tmp_path / "swapped.safetensors")))
    x = np.random.default_rng(0).integers(0, 256, (1, 448, 448, 3), dtype=np.uint8)
    assert not np.allclose(timm_forward(spec, model, x)[0], timm_forward(spec, ref, x)[0], atol=1e-3)


# ---- patch-16 encoders and the stride-16 CNN: 512 px, through the dataset's image_16px ---------------------------


def _patches_512(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)


def _trident_resnet50(saved: dict) -> torch.nn.Module:
    """TRIDENT's ResNet-50 baseline: timm's resnet50(features_only=True, out_indices=[3]), loaded non-strictly."""
    import timm

    trident = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3])
    trident.load_state_dict(saved, strict=False)
    return trident.eval()


def _normalised(spec, images_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["uni", "conch15", "gigapath", "resnet50"])
def test_patch16_extract_from_hub_checkpoint_equals_the_architectures_forward(name, prepared16, tmp_path, monkeypatch):
    """`featcache extract` of a 16 px-per-bin encoder reads image_16px (512 px) and stores the architecture's own
    output on those pixels: timm's forward_features for the ViTs, TRIDENT's layer3 model for ResNet-50."""
    import timm

    ws, _ = prepared16
    if name == "resnet50":  # small enough to run at full size; the checkpoint is the whole ImageNet network
        spec = get_spec(name)
        full = randomised(timm.create_model("resnet50", pretrained=False), seed=0)
        path, saved = hub_checkpoint(name, full, tmp_path)
        ref = _trident_resnet50(saved)
    else:
        spec = reduced_spec(name)
        monkeypatch.setitem(REGISTRY, name, spec)
        ref = reference_vit(name, seed=5)
        path, _ = hub_checkpoint(name, ref, tmp_path)
    out = tmp_path / "store.zarr"
    res = extract("tiny16", ExtractionConfig(name, str(path)), workspace=ws, output=str(out), show_progress=False)
    assert res.complete
    ident = FeatureStore(out).identity
    assert ident["geometry"]["px_per_bin"] == 16 and ident["geometry"]["patch_px"] == 512
    worst = 0.0
    for sample in ("P1", "P2"):
        feats = xr.open_zarr(out, group=sample)
        images = Workspace(ws).dataset("tiny16").images(sample, 16).values
        assert images.shape[1:] == (512, 512, 3)
        if name == "resnet50":
            with torch.inference_mode():
                grid = ref(_normalised(spec, images))[0]
            tokens, pooled = grid.permute(0, 2, 3, 1).numpy(), grid.mean(dim=(2, 3)).numpy()
        else:
            tokens, pooled = timm_forward(spec, ref, images)
        stored = feats.tokens.transpose("patch", "row", "col", "channel").values
        assert stored.shape == tokens.shape == (len(images), 32, 32, spec.dim)
        worst = max(worst, assert_fp16_close(stored, tokens))
        np.testing.assert_allclose(feats.pooled.values, pooled, rtol=1e-4, atol=1e-4)
    assert worst > 0
    print(f"{name}: max |stored - reference| = {worst:.2e} over {res.patches_total} patches at 512 px")


def test_conch_drops_its_contrastive_pooler_and_says_so(tmp_path):
    spec = reduced_spec("conch15")
    path, _ = hub_checkpoint("conch15", reference_vit("conch15", seed=5), tmp_path)
    _, prov = load_encoder(spec, resolve_weights(spec, str(path)))
    assert (
        sorted(k.split(".")[0] for k in prov["dropped_head_keys"]) == ["attn_pool_contrast"] * 8 + ["ln_contrast"] * 2
    )


def test_resnet50_layer3_grid_equals_tridents_features_only_model(tmp_path):
    """timm/resnet50.tv_in1k's model.safetensors (full ResNet-50 with layer4 and fc) loaded strictly into the
    truncated network gives TRIDENT's grid: timm's resnet50(features_only=True, out_indices=[3]) on the same pixels,
    and pooled its global average (TRIDENT's AdaptiveAvgPool2d)."""
    import timm

    spec = get_spec("resnet50")
    torch.manual_seed(0)
    full = randomised(timm.create_model("resnet50", pretrained=False), seed=0)
    path, saved = hub_checkpoint("resnet50", full, tmp_path)
    assert any(k.startswith("layer4.") for k in saved) and "fc.weight" in saved
    model, prov = load_encoder(spec, resolve_weights(spec, str(path)))
    assert {k.split(".")[0] for k in prov["dropped_head_keys"]} == {"layer4", "fc"}
    trident = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3])
    trident.load_state_dict(saved, strict=False)
    trident.eval()
    x = _patches_512(n=1)
    norm = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / (
        torch.tensor(spec.std).view(1, 3, 1, 1)
    )
    with torch.inference_mode():
        tokens, pooled = GridEncoder(spec, model)(torch.from_numpy(x))
        ref = trident(norm)[0]
    assert tokens.shape == (1, 32, 32, 1024)
    worst = assert_fp16_close(tokens.numpy().astype(np.float16), ref.permute(0, 2, 3, 1).numpy())
    print(f"resnet50: max |float16 tokens - TRIDENT's layer3| = {worst:.2e}")
    np.testing.assert_allclose(pooled.numpy(), ref.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-4)


# ---- strict loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["midnight12k", "conch15", "uni", "resnet50"])
def test_missing_or_unexpected_key_is_refused(name, tmp_path):
    import timm

    spec = reduced_spec(name)
    ref = timm.create_model("resnet50", pretrained=False) if name == "resnet50" else reference_vit(name, seed=1)
    _, state = hub_checkpoint(name, ref, tmp_path)
    victim = {
        "midnight12k": "encoder.layer.1.attention.attention.key.bias",  # half a qkv triple
        "conch15": "trunk.blocks.0.ls2.gamma",
        "uni": "blocks.0.mlp.fc2.weight",
        "resnet50": "layer3.5.bn3.running_var",
    }[name]
    extra = {
        "midnight12k": "encoder.layer.0.attention.attention.extra.weight",
        "conch15": "trunk.blocks.0.attn.extra",
        "uni": "blocks.7.attn.qkv.weight",
        "resnet50": "layer3.0.extra",  # only layer4 (and the head) may be dropped
    }[name]
    for label, broken in (
        ("missing", {k: v for k, v in state.items() if k != victim}),
        ("unexpected", {**state, extra: torch.zeros(3)}),
    ):
        path = tmp_path / f"{label}.safetensors"
        save_file(broken, str(path))
        with pytest.raises(FeatcacheError, match=label):
            load_encoder(spec, resolve_weights(spec, str(path)))


def test_conch_checkpoint_found_in_featcache_weights_folder(tmp_path, monkeypatch):
    """$FEATCACHE_WEIGHTS/conch15/ holding the hub's pytorch_model_vision.bin (its own file name) is found."""
    spec = reduced_spec("conch15")
    (tmp_path / "conch15").mkdir()
    hub_checkpoint("conch15", reference_vit("conch15", seed=2), tmp_path / "conch15")
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path))
    src = resolve_weights(spec, None)
    assert src.path.name == "pytorch_model_vision.bin" and src.found_via == "$FEATCACHE_WEIGHTS"
    load_encoder(spec, src)


def test_a_layer_the_registry_drops_is_refused_before_any_work():
    """ResNet-50's layer4 is removed from the network (TRIDENT's truncation): --layers 5 would name it."""
    from featcache.encoders import check_layers

    assert check_layers(get_spec("resnet50"), [4])[4] == {"grid": [32, 32], "dim": 1024, "module": "layer3"}
    with pytest.raises(FeatcacheError, match="does not use layer4.*layers are 1–4"):
        check_layers(get_spec("resnet50"), [5])
