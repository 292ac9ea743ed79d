"""Encoder registry: shapes, prefix tokens, parameter counts, token ↔ bin alignment, bf16 bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.encoders import REGISTRY, GridEncoder, build_model, get_spec
from featcache.errors import FeatcacheError

VITS = {"uni2h": 9, "virchow2": 5, "hoptimus0": 5}  # prefix tokens: 1 cls + register tokens


@pytest.mark.parametrize("name", list(VITS))
def test_registered_vits_on_meta_device(name):
    """Built with random weights on the meta device: no memory, real shapes."""
    spec = get_spec(name)
    model = build_model(spec, "meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(spec.params, rel=0.005)
    enc = GridEncoder(spec, model).to("meta")
    assert enc.num_prefix_tokens == VITS[name]
    tokens, pooled = enc(torch.empty(2, 448, 448, 3, dtype=torch.uint8, device="meta"))
    assert tuple(tokens.shape) == (2, 32, 32, spec.dim)
    assert tuple(pooled.shape) == (2, spec.pooled_dim)
    assert spec.pooled_dim == (2560 if name == "virchow2" else 1536)


def test_densenet121_grid_and_params():
    spec = get_spec("densenet121")
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(6.95e6, rel=0.01)
    with torch.inference_mode():
        tokens, pooled = GridEncoder(spec, model)(torch.zeros(1, 448, 448, 3, dtype=torch.uint8))
    assert tuple(tokens.shape) == (1, 14, 14, 1024) and tuple(pooled.shape) == (1, 1024)
    assert torch.allclose(pooled, torch.relu(tokens).mean(dim=(1, 2)), atol=1e-5)  # tokens: before the ReLU


def test_hoptimus_uses_its_own_normalisation():
    assert get_spec("hoptimus0").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("uni2h").mean == (0.485, 0.456, 0.406)


def test_token_ij_is_the_14px_block_of_bin_ij():
    """A ViT with no attention blocks: token (i, j) depends only on pixels [14i, 14i+14) × [14j, 14j+14)."""
    spec = get_spec("tiny-vit")
    torch.manual_seed(0)
    enc = GridEncoder(spec, build_model(spec, depth=0)).eval()
    white = torch.full((1, 448, 448, 3), 255, dtype=torch.uint8)
    marked = white.clone()
    marked[0, 14 * 5 : 14 * 6, 14 * 7 : 14 * 8] = 0  # bin (5, 7) of the patch
    with torch.inference_mode():
        a, _ = enc(white)
        b, _ = enc(marked)
    changed = (a - b).abs().amax(dim=-1)[0] > 1e-5
    assert changed.nonzero().tolist() == [[5, 7]]


def test_bf16_within_bound_of_fp32():
    spec = get_spec("tiny-vit")
    torch.manual_seed(1)
    enc = GridEncoder(spec, build_model(spec)).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 448, 448, 3), dtype=np.uint8))
    with torch.inference_mode():
        ref, _ = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = enc(x)
    low = low.float()
    rel = (low - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    cos = torch.nn.functional.cosine_similarity(low.reshape(-1, spec.dim), ref.reshape(-1, spec.dim), dim=1)
    assert rel < 0.03  # stated bound: 3 % relative RMS error
    assert cos.min() > 0.995


def test_unknown_encoder_message():
    with pytest.raises(FeatcacheError, match="known: densenet121"):
        get_spec("resnet")
    assert {"densenet121", "uni2h", "virchow2", "hoptimus0"} <= set(REGISTRY)
    assert all(REGISTRY[n].test_only for n in ("tiny-vit", "tiny-cnn"))


def test_densenet_grid_is_torchvisions_features(tmp_path):
    """Same weights, same patch: our cached grid is torchvision's densenet121().features(x), the grid Img2ST-Net
    decoded (the final batch norm without timm's ReLU); pooled is torchvision's ReLU + global average."""
    import torchvision
    from safetensors.torch import save_file

    from featcache.weights import load_encoder, resolve_weights

    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    for m in tv.modules():  # non-trivial running statistics, so the final batch norm matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tv_densenet121.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    spec = get_spec("densenet121")
    model, prov = load_encoder(spec, resolve_weights(spec, str(path)))
    assert sorted(prov["dropped_head_keys"]) == ["classifier.bias", "classifier.weight"]
    enc = GridEncoder(spec, model).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 448, 448, 3), dtype=np.uint8))
    normalised = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        spec.std
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens, pooled = enc(x)
        ref = tv.features(normalised)
        ref_pooled = torch.relu(ref).mean(dim=(2, 3))
    assert (ref < 0).float().mean() > 0.2  # the grid keeps its negative values
    assert torch.allclose(tokens.permute(0, 3, 1, 2).half().float(), ref.half().float(), atol=2e-3, rtol=1e-3)
    assert torch.allclose(pooled, ref_pooled, atol=1e-4, rtol=1e-4)
