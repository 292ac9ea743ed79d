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
    assert torch.allclose(pooled, tokens.mean(dim=(1, 2)), atol=1e-5)


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
