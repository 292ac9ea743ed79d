"""`train loocv` on Dask (train/cluster.py): one task per fold, on a LocalCluster or on a scheduler and
workers this test starts (127.0.0.1 only); a killed worker's fold resumes elsewhere; a crashing fold is
reported by name and file while the others finish; no process outlives the command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from train.cluster import FoldRunner
from train.loocv import loocv_configs, run_loocv

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(decoder="linear", epochs=4, batch_size=4, val_fraction=0.0, seed=0)
TAG = "FEATCACHE_TEST_TAG"
RUNS = Path("runs") / "tiny" / "tiny-cnn" / "random-linear"


def fresh_workspace(src: Path, dst: Path) -> Path:
    """The session workspace's dataset and feature stores, without any run."""
    for part in ("datasets", "features"):
        shutil.copytree(src / part, dst / part)
    return dst


def fold_metrics(ws: Path) -> dict:
    """The finished folds' test metrics."""
    out = {}
    for fold in sorted((ws / RUNS).glob("fold-*")):
        if not (fold / "metrics.json").is_file():
            continue
        m = json.loads((fold / "metrics.json").read_text())
        out[fold.name] = {k: m[k] for k in ("pcc_gene", "pcc_global", "spearman_gene", "mse", "ssim_st")}
    return out


def tagged(tag: str) -> list[int]:
    """Live processes started with ``TAG=tag`` in their environment (children inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{TAG}={tag}".encode() not in env or state == "Z":
            continue
        parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"resource_tracker" in (d / "cmdline").read_bytes():
            continue  # multiprocessing's helper of this test process itself, which ends with it
        found.append(int(d.name))
    return found


def assert_none_left(tag: str, wait: float = 20.0) -> None:
    deadline = time.time() + wait
    while tagged(tag) and time.time() < deadline:
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for pid in tagged(tag)}
    assert not left, f"processes left behind: {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serial(tiny_cnn_features, tmp_path_factory):
    """The reference: every fold trained one after another in this process."""
    import torch

    ws = fresh_workspace(tiny_cnn_features[0], tmp_path_factory.mktemp("serial"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker here: float sums split over threads differ in their last bits
    try:
        res = run_loocv("tiny", ["tiny-cnn"], ["random"], OPTIONS, workspace=ws, device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [t["worker"].startswith("in-process") for t in res["_tasks"]] == [True, True]
    return ws, fold_metrics(ws), res


@pytest.fixture
def tag(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    yield value
    assert_none_left(value)


RUNTIME = dict(device="cpu", in_memory="auto", overwrite=False, show_progress=False, tensorboard=False)


def test_a_local_cluster_gives_the_serial_result(serial, tiny_cnn_features, tmp_path, tag):
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    with FoldRunner(jobs=2, device="cpu", threads=1) as runner:  # as the serial run, on any number of cores
        res = run_loocv("tiny", ["tiny-cnn"], ["random"], OPTIONS, workspace=ws, runner=runner, show_progress=False)
    assert fold_metrics(ws) == serial[1]
    assert res["results"].keys() == serial[2]["results"].keys()
    assert all(t["worker"].startswith("tcp://127.0.0.1:") and t["error"] is None for t in res["_tasks"])
    assert [line.split()[0] for line in res["_placement"]] == [
        "tiny-cnn/random-linear/fold-P1",
        "tiny-cnn/random-linear/fold-P2",
    ]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_worker_killed_mid_fold_is_replaced_and_the_fold_resumes(serial, tiny_cnn_features, tmp_path, tag):
    from distributed import Client

    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]])]
    try:
        procs += [
            start(["distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"])
            for _ in range(2)
        ]
        watcher = Client(address, timeout="60s", set_as_default=False)
        watcher.wait_for_workers(2, timeout=120)
        killed: list[str] = []

        def kill_one_mid_fold():
            deadline = time.time() + 300
            while not killed and time.time() < deadline:
                for fold in (ws / RUNS).glob("fold-*"):
                    if (fold / "train_state.pt").is_file() and not (fold / "metrics.json").is_file():
                        for worker, keys in watcher.processing().items():
                            if any(f"/{fold.name}#" in str(k) for k in keys):
                                pid = watcher.run(os.getpid, workers=[worker])[worker]
                                os.kill(pid, signal.SIGKILL)  # as the OOM killer does
                                killed.append(fold.name)
                                return
                time.sleep(0.02)

        thread = threading.Thread(target=kill_one_mid_fold)
        thread.start()
        res = run_loocv(
            "tiny",
            ["tiny-cnn"],
            ["random"],
            OPTIONS,
            scheduler=address,
            workspace=ws,
            device="cpu",
            show_progress=False,
        )
        thread.join()
        watcher.close()
        assert len(killed) == 1
        report = next(t for t in res["_tasks"] if t["label"].endswith(killed[0]))
        assert report["resumed"] and report["error"] is None  # rerun elsewhere from the saved training state
        assert fold_metrics(ws) == serial[1]
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def train_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    code = "import sys; from pipeline.cli import train_main; sys.argv = ['train', *sys.argv[1:]]; train_main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )


def loocv_args(ws: Path, *extra: str) -> list[str]:
    return [
        "loocv",
        "--encoders",
        "tiny-cnn",
        "--modes",
        "random",
        "--dataset",
        "tiny",
        "--decoder",
        "linear",
        "--epochs",
        str(OPTIONS["epochs"]),
        "--batch-size",
        "4",
        "--val-fraction",
        "0",
        "--device",
        "cpu",
        "--workspace",
        str(ws),
        *extra,
    ]


def test_a_crashing_fold_is_named_with_its_file_and_the_others_finish(serial, tiny_cnn_features, tmp_path, tag):
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    shutil.copytree(serial[0] / RUNS / "fold-P1", ws / RUNS / "fold-P1")
    p1 = ws / RUNS / "fold-P1"
    for name in ("metrics.json", "checkpoint.pt"):
        (p1 / name).unlink()
    (p1 / "train_state.pt").write_bytes(b"not a torch file")  # damaged state to resume from
    proc = train_cli(loocv_args(ws, "--jobs", "2"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "1 of 2 fold(s) failed" in text and "fold-P1" in text and str(p1 / "train_state.pt") in text
    assert "Traceback" not in text
    assert fold_metrics(ws) == {"fold-P2": serial[1]["fold-P2"]}  # the other fold finished and is kept
    assert (ws / "results" / "tiny" / "encoder_loocv_comparison.json").is_file()

    shutil.rmtree(p1)
    shutil.copytree(serial[0] / RUNS / "fold-P1", p1)  # the fold fixed: the same command succeeds (both reused)
    proc = train_cli(loocv_args(ws, "--jobs", "2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("where the folds ran", 1)[1].splitlines()[1:3]
    for line, fold in zip(lines, ("fold-P1", "fold-P2")):
        name, worker, seconds, unit, state = line.split()
        assert name.endswith(fold) and worker.startswith("tcp://127.0.0.1:") and (unit, state) == ("s", "ok"), line
        assert float(seconds) >= 0


def test_a_deleted_store_chunk_is_named_and_nothing_hangs(tiny_cnn_features, tmp_path, tag):
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    tokens = ws / "features" / "tiny" / "tiny-cnn-random.zarr" / "P2" / "tokens"
    chunk = sorted(p for p in (tokens / "c").rglob("*") if p.is_file())[-1]
    chunk.unlink()
    proc = train_cli(loocv_args(ws, "--jobs", "2", "--in-memory", "no", "--epochs", "1"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "2 of 2 fold(s) failed" in text and "Traceback" not in text
    assert text.count(f"chunk file(s) missing: P2/tokens/{chunk.relative_to(tokens).as_posix()}") == 2


def test_an_unreachable_scheduler_is_one_message_and_nothing_is_written(tiny_cnn_features, tmp_path, tag):
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    proc = train_cli(loocv_args(ws, "--scheduler", address), timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert f"--scheduler {address}: cannot reach a Dask scheduler" in text and "Traceback" not in text
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before


def forged_lock(fold: Path, **holder) -> Path:
    lock = fold / ".writer.lock"
    lock.write_text(json.dumps({"pid": 4242, "since": "2026-01-01T00:00:00+0000", **holder}) + "\n")
    return lock


def test_the_lock_of_a_worker_the_scheduler_lost_is_cleared_and_a_live_ones_refused(
    serial, tiny_cnn_features, tmp_path, tag
):
    """A node that died leaves its fold's lock behind: the fold's retry on another node takes it over."""
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    for fold in ("fold-P1", "fold-P2"):
        shutil.copytree(serial[0] / RUNS / fold, ws / RUNS / fold)  # finished: the task takes the lock, reuses it
    with FoldRunner(jobs=2, device="cpu") as runner:
        scheduler = runner.client.scheduler.address
        live = sorted(runner.client.scheduler_info()["workers"])[0]
        gone = forged_lock(ws / RUNS / "fold-P1", host="node-a", worker="tcp://10.255.0.7:40123", scheduler=scheduler)
        held = forged_lock(ws / RUNS / "fold-P2", host="node-b", worker=live, scheduler=scheduler)
        configs = loocv_configs("tiny", ["tiny-cnn"], ["random"], ["P1", "P2"], OPTIONS)
        reports = runner.run(configs, ws, RUNTIME, show_progress=False)
    assert reports[0]["error"] is None and not gone.exists()
    assert "is being written by another featcache process (pid 4242 on host node-b" in reports[1]["error"]
    assert f"Dask worker {live}" in reports[1]["error"] and held.is_file()
    assert fold_metrics(ws) == serial[1]  # nothing of either fold was touched


def test_a_local_cluster_on_gpus_gives_each_worker_its_own(tmp_path, tag, monkeypatch):
    """Worker i sees GPU i mod G (its CUDA_VISIBLE_DEVICES) and holds GPU=1; no real GPU is needed to check it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with FoldRunner(jobs=2, device="cuda") as runner:
        seen = runner.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        resources = [w["resources"] for w in runner.client.scheduler_info()["workers"].values()]
    assert sorted(seen.values()) == ["3", "5"] and resources == [{"GPU": 1}, {"GPU": 1}]
    from featcache.errors import FeatcacheError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(FeatcacheError, match="no GPU is visible here"):
        FoldRunner(jobs=2, device="cuda").__enter__()


def test_slurm_flags_become_the_job_script(tmp_path, tag):
    from train.slurm import slurm_cluster

    cluster = slurm_cluster(gpus=1)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    flags = ["--slurm-partition", "gpuq", "--slurm-gpus", "2", "--slurm-memory", "4GB", "--slurm-walltime", "01:00:00"]
    proc = train_cli(loocv_args(tmp_path, *flags, "--slurm-script"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("#SBATCH -p gpuq", "#SBATCH --mem=4G", "#SBATCH -t 01:00:00", "#SBATCH --gres=gpu:2"):
        assert line in proc.stdout.splitlines(), proc.stdout
    assert "--resources GPU=2" in proc.stdout and not (tmp_path / "runs").exists()


def test_no_worker_outlives_a_killed_command(tiny_cnn_features, tmp_path, tag):
    """SIGKILL (no cleanup runs) of `train loocv --jobs 2` while its workers train: they end with it."""
    ws = fresh_workspace(tiny_cnn_features[0], tmp_path)
    code = "import sys; from pipeline.cli import train_main; sys.argv = ['train', *sys.argv[1:]]; train_main()"
    args = loocv_args(ws, "--jobs", "2", "--epochs", "200")
    parent = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not list((ws / RUNS).glob("fold-*/.writer.lock")) and time.time() < deadline:
            assert parent.poll() is None, parent.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert list((ws / RUNS).glob("fold-*/.writer.lock")), "no fold started"
        assert len(tagged(tag)) >= 3  # the command and its two workers
    finally:
        parent.kill()
        parent.wait(timeout=30)
    # the tag fixture's assert_none_left: every worker (and helper) process is gone within 20 s
