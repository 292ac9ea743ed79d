"""Run inside a private mount namespace (tests/test_disk.py): a workspace on a tiny tmpfs.

Each step runs a real featcache command in a subprocess and records its exit code, its last
stderr line and what is left on the disk; the test reads the JSON this prints.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

p1, p2, mount = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ws = mount / "ws"


def tmpfs(options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "featcache-test", str(mount)], check=True)


def remount(options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def run(*args) -> dict:
    p = subprocess.run([sys.executable, "-m", *args, "--workspace", str(ws)], capture_output=True, text=True)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return {"code": p.returncode, "last": lines[-1] if lines else "", "traceback": "Traceback" in p.stderr}


def fill(leave: int, where: Path = mount) -> Path:
    st = os.statvfs(where)
    filler = where / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def files() -> list[str]:
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file()) if ws.exists() else []


LEAVE_OUTPUT = 1_000_000  # room for the zarr store, not for the AnnData file (HDF5) too
out = {}
tmpfs("size=1m")
prepare = ("featcache", "prepare", "--dataset", "d", "--sample", f"P1={p1}", "--sample", f"P2={p2}")
out["prepare_full"] = {**run(*prepare), "left": [f for f in files() if not f.startswith("datasets/.")]}
out["prepare_full"]["hidden"] = [p.name for p in (ws / "datasets").iterdir()] if (ws / "datasets").exists() else []
remount("size=64m")
out["prepare_again"] = run(*prepare)

extract = (
    "featcache",
    "extract",
    "--encoder",
    "tiny-cnn",
    "--weights",
    "random:0",
    "--dataset",
    "d",
    "--chunk-patches",
    "1",
)
filler = fill(60_000)
out["extract_full"] = run(*extract)
filler.unlink()
out["extract_again"] = run(*extract)

train = (
    "train.cli",
    "decoder",
    "--fold",
    "P1",
    "--encoder",
    "tiny-cnn",
    "--mode",
    "random",
    "--dataset",
    "d",
    "--decoder",
    "linear",
    "--epochs",
    "2",
    "--batch-size",
    "2",
    "--val-fraction",
    "0",
)
filler = fill(4_000)
out["train_full"] = run(*train)
filler.unlink()
out["train_again"] = run(*train)

run_dir = next((ws / "runs").rglob("metrics.json")).parent
slide = next(p for p in p2.iterdir() if p.name.endswith(".btf"))
predict = ("featcache", "predict", "--run", str(run_dir), "--image", str(slide), "--positions", str(p2))
filler = fill(20_000)
out["predict_full"] = run(*predict)
out["predict_full"]["left"] = [f for f in files() if f.startswith("predictions")]
filler.unlink()
out["predict_again"] = run(*predict)
out["predict_again"]["left"] = [f for f in files() if f.startswith("predictions") and f.endswith("prediction.json")]

# --output on a disk of its own that is full: one message, nothing left there; then it completes
elsewhere = Path(f"{mount}-out")
elsewhere.mkdir(exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "featcache-out", str(elsewhere)], check=True)
output = ("--output", str(elsewhere / "pred"))
filler = fill(LEAVE_OUTPUT, elsewhere)
out["predict_output_full"] = run(*predict, *output)
out["predict_output_full"]["left"] = sorted(p.name for p in elsewhere.iterdir() if p != filler)
filler.unlink()
out["predict_output_again"] = run(*predict, *output)
pred = elsewhere / "pred"
out["predict_output_again"]["left"] = sorted(p.name for p in pred.iterdir()) if pred.is_dir() else []
subprocess.run(["umount", str(elsewhere)], check=False)

# the disk fills in the middle of a training run (after its first saved state): one message; once space is freed the
# same command resumes from the saved state and ends with every epoch logged once
mid = (*train[:-6], "--epochs", "1000", "--batch-size", "2", "--val-fraction", "0", "--name", "mid")
fold = ws / "runs" / "d" / "tiny-cnn" / "random-linear-mid" / "fold-P1"
first = subprocess.Popen([sys.executable, "-m", *mid, "--workspace", str(ws)], stderr=subprocess.PIPE, text=True)
while first.poll() is None and not (fold / "train_state.pt").exists():
    time.sleep(0.001)
first.send_signal(signal.SIGSTOP)
filler = fill(0)
first.send_signal(signal.SIGCONT)
err = first.communicate()[1]
lines = [ln for ln in err.splitlines() if ln.strip()]
out["train_mid_full"] = {"code": first.returncode, "last": lines[-1] if lines else "", "traceback": "Traceback" in err}
out["train_mid_full"]["finished"] = (fold / "metrics.json").exists()
filler.unlink()
out["train_mid_again"] = run(*mid)
log = (fold / "log.jsonl").read_text().splitlines() if (fold / "log.jsonl").exists() else []
out["train_mid_again"]["epochs"] = [json.loads(line)["epoch"] for line in log]
out["train_mid_again"]["finished"] = (fold / "metrics.json").exists()

remount("ro")
out["read_only"] = run("featcache", "prepare", "--dataset", "other", "--sample", f"P1={p1}")
subprocess.run(["umount", str(mount)], check=False)
print(json.dumps(out))
