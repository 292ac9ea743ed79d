"""Weights on a machine that is online: downloaded through huggingface_hub into its usual cache, from a hub
served on this machine (HF_ENDPOINT) — never the internet. A gated model without access gets one message."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch
from processes import left_behind
from safetensors.torch import save_file

from featcache.encoders import build_model, get_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAULTS = ("status-500", "status-401", "html")
HTML = b"<!DOCTYPE html><html><body>Please sign in to continue.</body></html>\n"


class Hub(http.server.BaseHTTPRequestHandler):
    """The few hub routes hf_hub_download uses: HEAD and GET of /<repo>/resolve/<revision>/<file>."""

    files: dict[str, bytes] = {}
    gated: set[str] = set()
    requests: list[str] = []

    def _answer(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        fault = parts.pop(0) if parts[0] in FAULTS else None  # an endpoint .../<fault> misbehaves that way
        if fault is not None and fault.startswith("status-"):
            self.send_response(int(fault.removeprefix("status-")))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        repo, name = "/".join(parts[:2]), parts[-1]
        if repo in self.gated:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = HTML if fault == "html" else self.files.get(f"{repo}/{name}")
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802 - the stdlib's name
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    torch.manual_seed(3)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(get_spec("densenet121")).state_dict().items()}, str(weights))
    Hub.files = {"timm/densenet121.tv_in1k/model.safetensors": weights.read_bytes()}
    Hub.gated = {"MahmoodLab/UNI2-h"}
    Hub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", weights
    server.shutdown()


def featcache(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "featcache", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_weights_are_downloaded_into_the_cache_and_gated_models_explained(hub, prepared, tmp_path):
    endpoint, weights = hub
    ws, _ = prepared
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    out = tmp_path / "dn.zarr"
    p = featcache(
        env,
        "extract",
        "--encoder",
        "densenet121",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--output",
        str(out),
        "--device",
        "cpu",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    cached = list((tmp_path / "hf" / "hub" / "models--timm--densenet121.tv_in1k" / "snapshots" / COMMIT).iterdir())
    assert [c.name for c in cached] == ["model.safetensors"] and cached[0].read_bytes() == weights.read_bytes()
    import json

    ident = json.loads((out / "zarr.json").read_text())["attributes"]["identity"]
    assert ident["weights"] == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    # a second run finds the cache and asks the hub nothing
    asked = len(Hub.requests)
    p = featcache(
        {**env, "HF_HUB_OFFLINE": "1"},
        "extract",
        "--encoder",
        "densenet121",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--output",
        str(out),
        "--device",
        "cpu",
    )
    assert p.returncode == 0 and len(Hub.requests) == asked
    # a gated model without access: one message saying what to do
    p = featcache(
        env,
        "extract",
        "--encoder",
        "uni2h",
        "--dataset",
        "tiny",
        "--workspace",
        str(ws),
        "--output",
        str(tmp_path / "u.zarr"),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "gated" in p.stderr and "accept its licence" in p.stderr and "hf auth login" in p.stderr
    assert not (tmp_path / "u.zarr").exists()


def test_hub_faults_are_named_and_a_bad_file_never_stays_in_the_cache(hub, prepared, tmp_path):
    """A server error, a refused connection, no access and an HTML page served as the checkpoint: each one message
    saying what happened; the HTML never stays in the cache (also when an older run left it there), so once the hub
    serves the file the same command downloads it (as in the test above)."""
    endpoint, weights = hub
    ws, _ = prepared
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there: connections are refused
    seeded = tmp_path / "hf-seeded" / "hub" / "models--timm--densenet121.tv_in1k"
    (seeded / "snapshots" / COMMIT).mkdir(parents=True)
    (seeded / "refs").mkdir()
    (seeded / "refs" / "main").write_text(COMMIT)
    (seeded / "snapshots" / COMMIT / "model.safetensors").write_bytes(HTML)  # what an older featcache left behind
    cases = {
        "500": f"{endpoint}/status-500",
        "401": f"{endpoint}/status-401",
        "refused": refused,
        "html": f"{endpoint}/html",
        "seeded": endpoint,
    }

    def env(case, url):
        e = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / f"hf-{case}"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        e.pop("HF_HUB_OFFLINE", None)
        e.pop("HF_TOKEN", None)
        return e

    def extract(case):
        out = tmp_path / f"{case}.zarr"
        return [*EXTRACT, "--workspace", str(ws), "--output", str(out)]

    # at once: the hub client retries a server error and a refused connection for ~25 s before giving up
    procs = {
        c: subprocess.Popen(extract(c), env=env(c, url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, url in cases.items()
    }
    try:
        errs = {c: (p.communicate(timeout=240)[1], p.returncode) for c, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    for case, (stderr, code) in errs.items():
        assert code == 2 and "Traceback" not in stderr, (case, stderr[-2000:])
        assert "has none of" not in stderr and not (tmp_path / f"{case}.zarr").exists(), (case, stderr[-2000:])
    said = {c: " ".join(e.split()) for c, (e, _) in errs.items()}
    assert f"the hub at {endpoint}/status-500 answered HTTP 500 (a server error)" in said["500"], said["500"]
    assert "refused access" in said["401"] and "HTTP 401" in said["401"] and "hf auth login" in said["401"]
    assert f"cannot reach the hub at {refused}" in said["refused"] and "refused" in said["refused"].split(refused)[1]
    for case in ("html", "seeded"):
        assert "is not a safetensors file but an HTML page" in said[case], said[case]
        assert "removed it from the cache" in said[case], said[case]
        snapshots = tmp_path / f"hf-{case}" / "hub" / "models--timm--densenet121.tv_in1k"
        assert [p for p in snapshots.rglob("*") if p.is_file() and p.parent.name != "refs"] == [], case
    assert left_behind(tmp_path) == []


EXTRACT = [sys.executable, "-m", "featcache", "extract", "--encoder", "densenet121", "--dataset", "tiny"]
EXTRACT += ["--device", "cpu"]
