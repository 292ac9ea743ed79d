"""Offline weights: files, folders, $FEATCACHE_WEIGHTS, the Hugging Face cache; strict and safe loading."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from featcache.encoders import GridEncoder, build_model, get_spec
from featcache.errors import FeatcacheError
from featcache.weights import load_encoder, resolve_weights

SPEC = get_spec("tiny-vit")


def _outputs(model):
    x = torch.arange(448 * 448 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(1, 448, 448, 3)
    with torch.inference_mode():
        return GridEncoder(SPEC, model)(x)


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(123)
    return build_model(SPEC)


@pytest.mark.parametrize("form", ["safetensors", "pt-module-prefix", "bin-in-folder", "pth-state-dict-key"])
def test_round_trip_gives_equal_outputs(original, tmp_path, form):
    state = {k: v.clone().contiguous() for k, v in original.state_dict().items()}
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif form == "pt-module-prefix":
        path = tmp_path / "w.pt"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif form == "bin-in-folder":
        (tmp_path / "ckpt").mkdir()
        torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
        path = tmp_path / "ckpt"
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    src = resolve_weights(SPEC, str(path))
    model, prov = load_encoder(SPEC, src)
    t0, p0 = _outputs(original)
    t1, p1 = _outputs(model)
    assert torch.equal(t0, t1) and torch.equal(p0, p1)
    assert prov["weights"] == "sha256:" + hashlib.sha256(src.path.read_bytes()).hexdigest()


def test_random_mode_is_seeded_and_explicit():
    a, pa = load_encoder(SPEC, resolve_weights(SPEC, "random:7"))
    b, _ = load_encoder(SPEC, resolve_weights(SPEC, "random:7"))
    c, _ = load_encoder(SPEC, resolve_weights(SPEC, "random:8"))
    assert pa["weights"] == "random:7"
    assert torch.equal(_outputs(a)[0], _outputs(b)[0]) and not torch.equal(_outputs(a)[0], _outputs(c)[0])
    assert resolve_weights(SPEC, "random").seed == 0


def test_env_folder_and_hf_cache(tmp_path, monkeypatch):
    spec = get_spec("densenet121")
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    # 1. $FEATCACHE_WEIGHTS/<encoder>/
    (tmp_path / "w" / "densenet121").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w" / "densenet121" / "model.safetensors"))
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "w"))
    assert resolve_weights(spec, None).found_via == "$FEATCACHE_WEIGHTS"
    # 2. an existing Hugging Face cache, read offline
    monkeypatch.delenv("FEATCACHE_WEIGHTS")
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--timm--densenet121.tv_in1k"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with_head = {
        **{k: v.contiguous() for k, v in state.items()},
        "classifier.weight": torch.zeros(1000, 1024),
        "classifier.bias": torch.zeros(1000),
    }
    save_file(with_head, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    src = resolve_weights(spec, None)
    assert src.found_via == "Hugging Face cache"
    model, prov = load_encoder(spec, src)
    assert sorted(prov["dropped_head_keys"]) == ["classifier.bias", "classifier.weight"]


def test_no_weights_message_lists_three_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("FEATCACHE_WEIGHTS", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FeatcacheError) as err:
        resolve_weights(get_spec("uni2h"), None)
    msg = str(err.value)
    assert "--weights PATH" in msg and "$FEATCACHE_WEIGHTS/uni2h/" in msg and "MahmoodLab/UNI2-h" in msg
    assert "random" in msg


class Payload:  # a pickle that needs code (this class) to load
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_needing_code_is_refused(original, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": original.state_dict(), "extra": Payload()}, path)
    with pytest.raises(FeatcacheError, match="refusing"):
        load_encoder(SPEC, resolve_weights(SPEC, str(path)))


def test_missing_and_unexpected_keys_are_errors(original, tmp_path):
    state = dict(original.state_dict())
    state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(FeatcacheError, match="missing"):
        load_encoder(SPEC, resolve_weights(SPEC, str(tmp_path / "missing.pt")))
    state = {**original.state_dict(), "blocks.9.extra": torch.zeros(3)}
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(FeatcacheError, match="unexpected"):
        load_encoder(SPEC, resolve_weights(SPEC, str(tmp_path / "extra.pt")))
    other = get_spec("tiny-cnn")
    with pytest.raises(FeatcacheError, match="does not fit"):
        load_encoder(other, resolve_weights(other, str(tmp_path / "extra.pt")))


def test_bad_weights_arguments(tmp_path):
    with pytest.raises(FeatcacheError, match="no such file"):
        resolve_weights(SPEC, str(tmp_path / "nope.pt"))
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(FeatcacheError, match="unsupported"):
        resolve_weights(SPEC, str(tmp_path / "w.onnx"))
    with pytest.raises(FeatcacheError, match="random:SEED"):
        resolve_weights(SPEC, "random:abc")
