"""The demo's pretrained small encoder (featcache/pretrain.py): the shipped weights are what the script makes,
from a synthetic cohort that shares no patient and no seed with the demo's."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict

import h5py
import pytest
import torch

from featcache import pretrain
from featcache.encoders import build_model, get_spec
from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from featcache.weights import WeightsSource, load_encoder, sha256_file
from pipeline import DEMO_SAMPLES, demo

RECORD = pretrain.shipped_record("tiny-cnn")
WEIGHTS = pretrain.shipped_weights("tiny-cnn")


def as_json(obj):
    return json.loads(json.dumps(obj))


def demo_seeds() -> set[int]:
    """The seed(s) the demo uses unless told otherwise."""
    out = set()
    for name, param in inspect.signature(demo).parameters.items():
        if name in ("seed", "seeds") and param.default is not inspect.Parameter.empty:
            out |= set(param.default) if isinstance(param.default, (tuple, list)) else {param.default}
    assert out, "the demo has no default seed"
    return out


def test_the_weights_ship_with_their_record_and_load_into_the_encoder():
    assert WEIGHTS is not None and RECORD is not None, "featcache/data/tiny-cnn-demo.{safetensors,json} are missing"
    assert sha256_file(WEIGHTS) == RECORD["weights"]["sha256"]
    assert WEIGHTS.stat().st_size == RECORD["weights"]["bytes"] < 1_000_000
    assert RECORD["settings"] == as_json(asdict(pretrain.DEFAULT)), "the record's settings are not the script's"
    spec = get_spec("tiny-cnn")
    model, prov = load_encoder(spec, WeightsSource("file", WEIGHTS, found_via="test"))
    assert prov["weights"] == "sha256:" + RECORD["weights"]["sha256"]
    torch.manual_seed(0)
    random = build_model(spec).state_dict()
    trained = model.state_dict()
    moved = [k for k, v in trained.items() if v.is_floating_point() and not torch.allclose(v, random[k].to(v.dtype))]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in trained.values())
    assert int(trained["bn1.num_batches_tracked"]) > 0  # BatchNorm statistics are those of the pretraining
    assert RECORD["quick_rebuild"]["settings"] == as_json(asdict(pretrain.DEFAULT.quick()))


def test_the_pretraining_cohort_shares_no_patient_and_no_seed_with_the_demo():
    for cfg in (pretrain.DEFAULT, pretrain.DEFAULT.quick()):
        assert not set(cfg.patients) & set(DEMO_SAMPLES)
        assert cfg.cohort_seed not in demo_seeds()
    assert set(RECORD["cohort"]["patients"]) == set(pretrain.DEFAULT.patients)
    assert RECORD["cohort"]["seed"] == pretrain.DEFAULT.cohort_seed
    assert pretrain.DEFAULT.held_out not in RECORD["cohort"]["trained_on"]


def test_the_demo_refuses_the_pretraining_seed(tmp_path):
    with pytest.raises(FeatcacheError, match="seed"):
        demo(tmp_path, seed=pretrain.DEFAULT.cohort_seed)
    assert not any(tmp_path.iterdir())  # refused before synthesizing anything


def test_a_reduced_rebuild_reproduces_the_recorded_file_and_its_data_are_not_the_demos(tmp_path):
    """The script at its --quick settings (same code path: synthesize, prepare, train, cast, save) rebuilds the
    file whose sha256 the full build recorded; a full rebuild is checked with FEATCACHE_FULL_REBUILD=1."""
    threads = torch.get_num_threads()
    cfg = pretrain.DEFAULT.quick()
    made = pretrain.build(cfg, tmp_path / "quick.safetensors", workdir=tmp_path / "cohort")
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert made["sha256"] == sha256_file(tmp_path / "quick.safetensors") == RECORD["quick_rebuild"]["sha256"]
    ds = Workspace.resolve(tmp_path / "cohort" / "ws").open_dataset("pretrain")
    assert set(ds.patients) == set(cfg.patients) and not set(ds.patients) & set(DEMO_SAMPLES)
    for p in cfg.patients:
        with h5py.File(tmp_path / "cohort" / "raw" / p / "synthetic_truth.h5") as f:
            assert int(f.attrs["seed"]) == cfg.cohort_seed not in demo_seeds()


@pytest.mark.skipif(not os.environ.get("FEATCACHE_FULL_REBUILD"), reason="a full rebuild takes minutes")
def test_a_full_rebuild_reproduces_the_shipped_file(tmp_path):
    made = pretrain.build(pretrain.DEFAULT, tmp_path / "full.safetensors")
    assert made["sha256"] == sha256_file(WEIGHTS)
