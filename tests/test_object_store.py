"""Feature stores in object storage (--features-root s3://...), against a real S3 server on 127.0.0.1.

The server is moto's (``moto_server``), started here as a process of its own with authentication on:
the first three requests create an IAM user with S3 rights and its access key, and every request
after them must be signed with that key, so wrong credentials are refused as a real S3 refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import featcache_app, train_app  # noqa: E402

BUCKET = "featcache-test"
ROOT = f"s3://{BUCKET}/features"
POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
EXTRACT = [
    "extract",
    "--encoder",
    "tiny-cnn",
    "--weights",
    "random:0",
    "--dataset",
    "tiny",
    "--chunk-patches",
    "2",
    "--batch-size",
    "2",
]
TRAIN = ["decoder", "--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny"]
TRAIN += ["--decoder", "linear", "--val-fraction", "0", "--epochs", "3", "--batch-size", "4", "--device", "cpu"]
TRAIN += ["--in-memory", "no"]  # every epoch streams its batches from the store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields the environment that reaches it."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    cmd = [str(server)] if server.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="featcache")
        iam.put_user_policy(UserName="featcache", PolicyName="s3", PolicyDocument=POLICY)
        key = iam.create_access_key(UserName="featcache")["AccessKey"]
        env = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield {"env": env, "client": client}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def objects(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def workspace(prepared, tmp_path) -> Path:
    """A workspace of its own holding a copy of the prepared dataset 'tiny' and nothing else."""
    ws, _ = prepared
    shutil.copytree(Path(ws) / "datasets" / "tiny", tmp_path / "ws" / "datasets" / "tiny")
    return tmp_path / "ws"


def invoke(app, args, s3, **env):
    r = CliRunner().invoke(
        app, args, env={**s3["env"], "FEATCACHE_STORAGE_OPTIONS": None, "FEATCACHE_FEATURES_ROOT": None, **env}
    )
    assert r.exit_code == 0, r.output
    return r.output


def test_extract_writes_only_to_the_bucket_and_training_from_it_equals_a_local_store(
    s3, workspace, tmp_path, monkeypatch
):
    ws = ["--workspace", str(workspace)]
    out = invoke(featcache_app, [*EXTRACT, *ws, "--features-root", ROOT], s3)
    assert "store complete: s3://featcache-test/features/tiny/tiny-cnn-random.zarr" in out
    assert not (workspace / "features").exists()
    keys = objects(s3["client"], "features/tiny/tiny-cnn-random.zarr/")
    assert "features/tiny/tiny-cnn-random.zarr/zarr.json" in keys
    assert any("/P1/tokens/c/" in k for k in keys) and any("/P2/_done/" in k for k in keys)

    # the environment variable names the same root for every command
    listing = invoke(featcache_app, ["ls", *ws], s3, FEATCACHE_FEATURES_ROOT=ROOT + "/")
    assert "tiny-cnn-random" in listing and "complete" in listing
    assert "OK s3://featcache-test/features/tiny/tiny-cnn-random.zarr" in " ".join(
        invoke(featcache_app, ["verify", "--dataset", "tiny", *ws], s3, FEATCACHE_FEATURES_ROOT=ROOT).split()
    )
    remote = invoke(train_app, [*TRAIN, *ws, "--features-root", ROOT], s3)
    assert not (workspace / "features").exists()

    local_ws = tmp_path / "local"
    shutil.copytree(workspace / "datasets", local_ws / "datasets")
    invoke(featcache_app, [*EXTRACT, "--workspace", str(local_ws)], s3)
    local = invoke(train_app, [*TRAIN, "--workspace", str(local_ws)], s3)
    assert remote.split("\n")[0] == local.split("\n")[0]  # pcc_gene, pcc_global, ssim, mse as printed
    run = Path("runs/tiny/tiny-cnn/random-linear/fold-P2")
    m_remote = json.loads((workspace / run / "metrics.json").read_text())
    m_local = json.loads((local_ws / run / "metrics.json").read_text())
    assert m_remote == m_local
    c_remote = json.loads((workspace / run / "config.json").read_text())
    c_local = json.loads((local_ws / run / "config.json").read_text())
    assert c_remote["features"] == c_local["features"]  # the store by identity, wherever it lives
    assert c_remote["features"]["store"] == "tiny-cnn-random" and "s3://" not in json.dumps(c_remote["features"])

    # stage 3 reads the same values from the bucket as from the disk
    from analysis import open_features
    from analysis.cli import app as analysis_app

    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    remote_tokens = open_features("tiny", "tiny-cnn-random", "P1", workspace, features_root=ROOT)
    local_tokens = open_features("tiny", "tiny-cnn-random", "P1", local_ws)
    assert remote_tokens.shape == local_tokens.shape and np.array_equal(remote_tokens.values, local_tokens.values)
    out = invoke(
        analysis_app, ["export", "--features", "tiny-cnn-random", "--dataset", "tiny", *ws, "--features-root", ROOT], s3
    )
    assert "wrote" in out and not (workspace / "features").exists()


def test_verify_repair_and_resume_on_s3(s3, workspace, tmp_path):
    root = f"s3://{BUCKET}/resume"
    ws = ["--workspace", str(workspace), "--features-root", root]
    invoke(featcache_app, [*EXTRACT, *ws], s3)
    prefix = "resume/tiny/tiny-cnn-random.zarr/"
    before = {k: s3["client"].get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in objects(s3["client"], prefix)}
    chunk = next(k for k in sorted(before) if "/P1/tokens/c/" in k)
    s3["client"].delete_object(Bucket=BUCKET, Key=chunk)
    r = CliRunner().invoke(featcache_app, ["verify", "--dataset", "tiny", *ws], env=s3["env"])
    assert r.exit_code == 1 and "is missing" in r.output and "BAD" in r.output
    r = CliRunner().invoke(featcache_app, ["verify", "--repair", "--dataset", "tiny", *ws], env=s3["env"])
    assert r.exit_code == 1 and "dropped the markers of 1 bad chunk" in r.output
    out = invoke(featcache_app, [*EXTRACT, *ws], s3)
    assert "extracted 2 patches" in out and "already done" in out and "store complete" in out
    assert "OK" in invoke(featcache_app, ["verify", "--dataset", "tiny", *ws], s3)
    after = {k: s3["client"].get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in objects(s3["client"], prefix)}
    root_meta = prefix + "zarr.json"  # its provenance records when the last run started
    assert {k: v for k, v in after.items() if k != root_meta} == {k: v for k, v in before.items() if k != root_meta}
    identity = json.loads(before[root_meta])["attributes"]["identity"]
    assert json.loads(after[root_meta])["attributes"]["identity"] == identity

    # a store of another identity is refused as on disk, and left as it is
    r = CliRunner().invoke(featcache_app, [*EXTRACT, *ws, "--chunk-patches", "3"], env=s3["env"])
    assert r.exit_code != 0 and "was made with a different identity (chunk_patches: stored 2 vs now 3" in r.output
    assert objects(s3["client"], prefix) == sorted(after)
    assert not (workspace / "features").exists()


@pytest.fixture
def fresh_process():
    """Forget the file systems and checked buckets of earlier commands in this process, as a new process would:
    s3fs reuses an instance made with other credentials or another endpoint, and each bucket is checked once."""
    from s3fs import S3FileSystem

    from featcache.stores import location

    S3FileSystem.clear_instance_cache()
    location._reached.clear()
    yield
    S3FileSystem.clear_instance_cache()
    location._reached.clear()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-bucket", "bucket s3://no-such-bucket does not exist at http://127.0.0.1"),
        ("wrong-secret", "access to s3://featcache-test at http://127.0.0.1"),
        ("unreachable", "cannot reach s3://featcache-test at http://127.0.0.1"),
    ],
    ids=["no-bucket", "wrong-secret", "unreachable"],
)
def test_bad_object_store_input_is_one_message_and_writes_nothing(s3, workspace, fresh_process, case, message):
    env, root = {**s3["env"], "FEATCACHE_STORAGE_OPTIONS": None, "FEATCACHE_FEATURES_ROOT": None}, f"s3://{BUCKET}/bad"
    if case == "no-bucket":
        root = "s3://no-such-bucket/features"
    elif case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1")
    before = objects(s3["client"])
    for args in (EXTRACT, ["ls", "--dataset", "tiny"], ["verify", "--dataset", "tiny"]):
        r = CliRunner().invoke(featcache_app, [*args, "--workspace", str(workspace), "--features-root", root], env=env)
        lines = [line for line in r.output.splitlines() if line.strip() and not line.startswith("OK ")]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
        assert message in lines[0] and isinstance(r.exception, SystemExit)
    assert objects(s3["client"]) == before
    assert sorted(p.name for p in workspace.iterdir()) == ["datasets"]
    assert [b["Name"] for b in s3["client"].list_buckets()["Buckets"]] == [BUCKET]


def test_a_shared_folder_as_features_root(workspace, tmp_path, monkeypatch):
    shared = tmp_path / "shared-fs"
    monkeypatch.setenv("FEATCACHE_FEATURES_ROOT", str(shared))
    r = CliRunner().invoke(featcache_app, [*EXTRACT, "--workspace", str(workspace)])
    assert r.exit_code == 0, r.output
    assert (shared / "tiny" / "tiny-cnn-random.zarr" / "zarr.json").is_file()
    assert not (workspace / "features").exists()
    r = CliRunner().invoke(featcache_app, ["ls", "--workspace", str(workspace)])
    assert "tiny-cnn-random" in r.output and "complete" in r.output
    (tmp_path / "a-file").write_text("")
    r = CliRunner().invoke(
        featcache_app, ["ls", "--workspace", str(workspace), "--features-root", str(tmp_path / "a-file")]
    )
    assert r.exit_code == 2 and "is a file, not a folder" in r.output
