"""`train loocv --slurm-*` (train/slurm.py) against a real single-node Slurm on 127.0.0.1.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`benchmarks/slurm_local.sh install`, which
`.ci/run` does) and root (slurmd runs the jobs). The test starts the daemons with
`benchmarks/slurm_local.sh start DIR` on free ports and stops them after; each Dask worker is a Slurm
job started by dask-jobqueue's SLURMCluster; a 3-fold LOOCV through them equals the serial run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import SMALL
from test_cluster import OPTIONS, TAG, assert_none_left, fold_metrics, free_port, fresh_workspace

from featcache.synth import synthesize
from train.loocv import run_loocv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "slurm_local.sh"
MISSING = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"needs a single-node Slurm: Debian's slurmctld, slurmd, slurm-client, munge (missing: {MISSING}; "
    "`benchmarks/slurm_local.sh install`) and root (slurmd runs the jobs)",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = Path(f"/tmp/fc-slurm-{uuid.uuid4().hex[:8]}")  # short: munge's socket path must fit a sockaddr
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    try:
        subprocess.run(["bash", str(SCRIPT), "start", str(d)], check=True, env=env, timeout=180)
        yield d / "slurm.conf"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], env=env, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def trio_features(synth_dir, tmp_path_factory):
    """Three patients (P1, P2, P5) prepared, with random-init tiny-cnn features."""
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset

    extra = tmp_path_factory.mktemp("p5")
    synthesize(extra, ["P5"], SMALL)
    ws = tmp_path_factory.mktemp("slurm-ws")
    samples = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2"), "P5": str(extra / "P5")}
    prepare_dataset("tiny", samples, workspace=ws, show_progress=False)
    extract("tiny", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    return ws


def test_a_three_fold_loocv_on_slurm_equals_the_serial_run(slurm, trio_features, tmp_path, monkeypatch):
    import torch

    serial = fresh_workspace(trio_features, tmp_path / "serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Dask worker (its nanny sets OMP_NUM_THREADS=1)
    try:
        run_loocv("tiny", ["tiny-cnn"], ["random"], OPTIONS, workspace=serial, device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(threads)

    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    monkeypatch.setenv("SLURM_CONF", str(slurm))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    config = tmp_path / "jobqueue.yaml"  # a YAML the user keeps, in dask-jobqueue's own format
    config.write_text(
        "jobqueue:\n  slurm:\n    cores: 1\n    memory: 4GB\n    walltime: '00:20:00'\n"
        f"    log-directory: {tmp_path / 'slurm-logs'}\n"
        "    scheduler-options: {host: 127.0.0.1, dashboard_address: null}\n"
        "    worker-extra-args: [--host, 127.0.0.1, --no-dashboard]\n"
    )
    ws = fresh_workspace(trio_features, tmp_path / "slurm")
    res = run_loocv(
        "tiny",
        ["tiny-cnn"],
        ["random"],
        OPTIONS,
        jobs=2,
        slurm={"partition": "local", "config": str(config)},
        workspace=ws,
        device="cpu",
        show_progress=False,
    )
    assert len(fold_metrics(ws)) == 3 and fold_metrics(ws) == fold_metrics(serial)
    assert all(t["worker"].startswith("tcp://127.0.0.1:") and t["error"] is None for t in res["_tasks"])
    logs = list((tmp_path / "slurm-logs").glob("*.err"))  # each worker ran as a Slurm job (dask-worker-<id>.err)
    assert logs and all(p.stem.startswith("dask-worker-") for p in logs)
    env = {**os.environ, "SLURM_CONF": str(slurm)}
    deadline = time.time() + 60
    while True:  # the jobs end once the cluster is closed (scancel by dask-jobqueue)
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, timeout=30)
        if not queue.stdout.strip() or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not queue.stdout.strip(), f"Slurm jobs left: {queue.stdout}"
    assert_none_left(tag, wait=60)
    comparison = json.loads((ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_text())
    assert set(comparison["results"]["tiny-cnn_random-linear"]["fold_results"]) == {"test_P1", "test_P2", "test_P5"}
