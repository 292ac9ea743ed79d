"""`featcache extract` and the feature store: contents, identity, resume after SIGKILL, shards, verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from featcache.encoders import GridEncoder, get_spec
from featcache.errors import FeatcacheError
from featcache.extract import ExtractionConfig, extract
from featcache.stores import FeatureStore, Workspace
from featcache.weights import load_encoder, resolve_weights
from pipeline.cli import featcache_app as app

TINY_VIT = ExtractionConfig("tiny-vit", "random:0", chunk_patches=2)


def store_status(location):
    return FeatureStore(location).status()


def verify_store(location):
    return FeatureStore(location).verify()


def chunk_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "/c/" in str(p.relative_to(store)).replace("\\", "/") + "/"
    }


def run_cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "featcache", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def tiny_store(prepared):
    ws, _ = prepared
    res = extract("tiny", TINY_VIT, workspace=ws, show_progress=False, batch_size=4)
    return ws, Path(res.store), res


def test_store_contents_equal_the_encoder_on_each_patch(tiny_store):
    ws, store, res = tiny_store
    assert res.complete and store.name == "tiny-vit-random.zarr"
    assert store == Workspace(ws).feature_store("tiny", "tiny-vit", random=True).path
    spec = get_spec("tiny-vit")
    model, _ = load_encoder(spec, resolve_weights(spec, "random:0"))
    enc = GridEncoder(spec, model).eval()
    for sample in ("P1", "P2"):
        feats = xr.open_zarr(store, group=sample)
        patches = xr.open_zarr(Workspace(ws).dataset("tiny").patches_path, group=sample)
        assert feats.tokens.dims == ("patch", "channel", "row", "col")
        assert feats.tokens.dtype == np.float16 and feats.tokens.shape[1:] == (48, 32, 32)
        assert np.array_equal(feats.origin.values, patches.origin.values)
        with torch.inference_mode():
            tok, pooled = enc(torch.from_numpy(patches.image.values))
        stored = feats.tokens.transpose("patch", "row", "col", "channel").values
        assert np.array_equal(stored, tok.numpy().astype(np.float16))
        assert np.allclose(feats.pooled.values, pooled.numpy(), rtol=1e-6, atol=1e-6)


def test_identity_is_recorded(tiny_store, prepared):
    ws, store, _ = tiny_store
    ident = zarr.open_group(zarr.storage.LocalStore(store), mode="r").attrs["identity"]
    meta = json.loads(Workspace(ws).dataset("tiny").meta_path.read_text())
    assert ident["weights"] == "random:0" and ident["arch"] == "vit_tiny_patch16_224"
    assert ident["prefix_tokens_dropped"] == 3 and ident["stored_dtype"] == "float16"
    assert ident["dataset_fingerprint"] == meta["fingerprint"] and ident["input_px"] == 448
    assert ident["mean"] == [0.485, 0.456, 0.406] and ident["geometry"]["px_per_bin"] == 14


def test_rerun_skips_everything_and_other_identity_is_refused(tiny_store):
    ws, store, _ = tiny_store
    before = chunk_files(store)
    again = extract("tiny", TINY_VIT, workspace=ws, show_progress=False, batch_size=4)
    assert again.patches_done == 0 and again.skipped == again.patches_total and again.complete
    assert chunk_files(store) == before
    # (another random seed is another store, <encoder>-random-s<seed>: docs/design.md §7)
    with pytest.raises(FeatcacheError, match="different identity.*chunk_patches"):
        extract("tiny", replace(TINY_VIT, chunk_patches=3), workspace=ws, show_progress=False, batch_size=4)
    assert chunk_files(store) == before


def test_verify_names_corrupted_and_missing_chunks(tiny_store, tmp_path):
    import shutil

    _, store, _ = tiny_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    assert verify_store(copy).ok
    target = copy / "P1" / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    (copy / "P2" / "pooled" / "c" / "0" / "0").unlink()
    rep = verify_store(copy)
    assert any("P1/tokens chunk 1" in p and "corrupted" in p for p in rep.problems), rep.problems
    assert any("P2/pooled chunk 0" in p and "missing" in p for p in rep.problems), rep.problems
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "P1/tokens chunk 1" in result.output


def test_ls_and_info(tiny_store):
    ws, store, _ = tiny_store
    result = CliRunner().invoke(app, ["ls", "--workspace", str(ws)])
    assert result.exit_code == 0 and "tiny-vit-random.zarr" in result.output and "complete" in result.output
    result = CliRunner().invoke(app, ["info", str(store)])
    info = json.loads(result.output)
    assert info["complete"] and info["identity"]["encoder"] == "tiny-vit"


def test_fsspec_url_store(prepared):
    ws, _ = prepared
    url = "memory://featcache-test/tiny.zarr"
    res = extract("tiny", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, output=url, show_progress=False)
    assert res.complete
    st = store_status(url)
    assert st.complete and st.identity["grid"] == [14, 14] and verify_store(url).ok


def test_resume_after_sigkill_gives_identical_bytes(prepared, tmp_path):
    ws, _ = prepared
    args = [
        "extract",
        "--encoder",
        "densenet121",
        "--weights",
        "random:0",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--batch-size",
        "1",
        "--chunk-patches",
        "1",
        "--device",
        "cpu",
    ]
    killed = tmp_path / "killed.zarr"
    proc = run_cli(*args, "--output", str(killed))
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list(killed.glob("*/_done/[0-9]*"))
        if len(done) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = store_status(killed)
    assert not st.complete, "the run finished before it could be killed"
    assert (
        subprocess.run(
            [sys.executable, "-m", "featcache", *args, "--output", str(killed)], capture_output=True
        ).returncode
        == 0
    )
    clean = tmp_path / "clean.zarr"
    assert (
        subprocess.run(
            [sys.executable, "-m", "featcache", *args, "--output", str(clean)], capture_output=True
        ).returncode
        == 0
    )
    assert store_status(killed).complete
    a, b = chunk_files(killed), chunk_files(clean)
    assert a.keys() == b.keys() and a == b


def test_two_concurrent_shards_make_one_valid_store(prepared, tmp_path):
    ws, _ = prepared
    base = [
        "extract",
        "--encoder",
        "tiny-vit",
        "--weights",
        "random:0",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--batch-size",
        "1",
        "--chunk-patches",
        "1",
        "--device",
        "cpu",
    ]
    sharded = tmp_path / "sharded.zarr"
    procs = [run_cli(*base, "--output", str(sharded), "--shard", f"{k}/2") for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert verify_store(sharded).ok
    single = tmp_path / "single.zarr"
    assert (
        subprocess.run(
            [sys.executable, "-m", "featcache", *base, "--output", str(single)], capture_output=True
        ).returncode
        == 0
    )
    assert chunk_files(sharded) == chunk_files(single)
    # torchrun's environment is picked up the same way
    env_store = tmp_path / "env.zarr"
    p = run_cli(*base, "--output", str(env_store), env={"RANK": "1", "WORLD_SIZE": "2"})
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "shard 1/2" in out and "incomplete" in out


def test_a_shard_joins_a_store_whose_root_another_shard_is_still_writing(prepared, tmp_path):
    """The moment between a shard's first file (its zarr.json, written to a hidden temporary name) and
    the root appearing: the other shard must not take the folder for a user's and refuse it."""
    ws, _ = prepared
    racing = tmp_path / "racing.zarr"
    racing.mkdir()
    (racing / ".zarr.json.tmp-0123abcd").write_bytes(b'{"zarr_format": 3, "node_ty')  # half of a root, mid-write
    args = ["extract", "--encoder", "tiny-cnn", "--weights", "random:0", "--dataset", "tiny", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--workspace", str(ws), "--output", str(racing)])
    assert r.exit_code == 0, r.output
    assert verify_store(racing).ok
    # a user's own file beside it still marks the folder as foreign
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".zarr.json.tmp-0123abcd").write_bytes(b"{}")
    (mine / "notes.txt").write_text("precious")
    r = CliRunner().invoke(app, [*args, "--workspace", str(ws), "--output", str(mine)])
    assert r.exit_code != 0 and "featcache did not make" in r.output
    assert (mine / "notes.txt").read_text() == "precious"


def test_non_finite_features_are_an_error(prepared, tmp_path):
    ws, _ = prepared
    spec = get_spec("tiny-vit")
    model, _ = load_encoder(spec, resolve_weights(spec, "random:0"))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["norm.weight"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "nan.zarr"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--encoder",
            "tiny-vit",
            "--weights",
            str(tmp_path / "nan.safetensors"),
            "--dataset",
            "tiny",
            "--workspace",
            str(ws),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "non-finite" in result.output
    assert not list(out.glob("*/_done/[0-9]*"))
    assert not store_status(out).complete


def test_extract_bad_input(prepared, tmp_path):
    ws, _ = prepared
    r = CliRunner().invoke(
        app, ["extract", "--encoder", "tiny-vit", "--weights", "random", "--dataset", "nope", "--workspace", str(ws)]
    )
    assert r.exit_code == 2 and "featcache prepare" in r.output
    r = CliRunner().invoke(app, ["extract", "--encoder", "uni2h", "--dataset", "tiny", "--workspace", str(ws)])
    assert r.exit_code == 2 and "no weights found" in r.output
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--encoder",
            "tiny-vit",
            "--weights",
            "random",
            "--dataset",
            "tiny",
            "--workspace",
            str(ws),
            "--shard",
            "2/2",
        ],
    )
    assert r.exit_code == 2 and "0 <= K < N" in r.output
    assert not (ws / "features" / "tiny" / "uni2h.zarr").exists()


def _rank_processes(tag: str) -> dict[int, int]:
    """{RANK: pid} of the live processes torchrun started with ``FEATCACHE_TEST_TAG=tag``."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if env.get(b"FEATCACHE_TEST_TAG") == tag.encode() and b"RANK" in env and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = int(d.name)
    return found


def test_two_ranks_under_torchrun_write_the_single_process_store_and_a_killed_rank_resumes(prepared, tmp_path):
    """`torchrun --nproc-per-node 2 -m featcache extract` on the CPU: two processes, one store whose chunks
    equal a single-process extract's, byte for byte; a rank SIGKILLed mid-way (torchrun then stops the
    other) is restarted by running the same command again, and the store it finishes is the same."""
    ws, _ = prepared
    base = [
        "extract",
        "--encoder",
        "densenet121",
        "--weights",
        "random:0",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--batch-size",
        "1",
        "--chunk-patches",
        "1",
        "--device",
        "cpu",
    ]
    single = tmp_path / "single.zarr"
    # torchrun gives each rank one thread (OMP_NUM_THREADS=1); a convolution's float sums split over more
    # threads differ in their last bits, so the single-process reference runs with one thread too
    assert run_cli(*base, "--output", str(single), env={"OMP_NUM_THREADS": "1"}).wait(timeout=300) == 0
    tag = f"torchrun-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "FEATCACHE_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

    def launch(store: Path) -> subprocess.Popen:
        args = [*torchrun, "-m", "featcache", *base, "--output", str(store)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    both = tmp_path / "torchrun.zarr"
    p = launch(both)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "shard 0/2" in out and "shard 1/2" in out  # two ranks, each its own part
    assert verify_store(both).ok and chunk_files(both) == chunk_files(single)

    killed = tmp_path / "killed.zarr"
    p = launch(killed)
    deadline = time.time() + 240
    victim = None
    while time.time() < deadline and victim is None:
        ranks = _rank_processes(tag)
        if 1 in ranks and len(list(killed.glob("*/_done/[0-9]*"))) >= 1:
            victim = ranks[1]
        time.sleep(0.02)
    assert victim is not None, "rank 1 never started writing"
    os.kill(victim, signal.SIGKILL)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0  # torchrun reports the lost rank and stops the other
    assert not store_status(killed).complete, "the run finished before rank 1 could be killed"
    p = launch(killed)  # the same command again: each rank skips its finished chunks
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert store_status(killed).complete and verify_store(killed).ok
    assert chunk_files(killed) == chunk_files(single)
    assert not _rank_processes(tag)
