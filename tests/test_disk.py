"""A full disk and a read-only file system, for real: the workspace on a small tmpfs in a private
mount namespace (``unshare``). Each command ends in one message and leaves nothing half-written;
after space is freed, the same command completes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "disk_scenario.py"


def namespace_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /tmp && echo ok"], capture_output=True, text=True
    )
    return probe.stdout.strip() == "ok"


@pytest.mark.skipif(not namespace_available(), reason="no user+mount namespaces here (unshare -rm) for a real tmpfs")
def test_full_disk_and_read_only_workspace(synth_dir, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, str(SCRIPT), str(synth_dir / "P1"), str(synth_dir / "P2"), str(mount)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    for step in ("prepare_full", "extract_full", "train_full", "predict_full"):
        assert steps[step]["code"] == 2 and not steps[step]["traceback"], steps[step]
        assert steps[step]["last"].startswith("error: the disk is full"), steps[step]
    assert steps["prepare_full"]["left"] == [] and steps["prepare_full"]["hidden"] == []  # nothing half-written
    assert steps["predict_full"]["left"] == [], steps["predict_full"]  # the hidden prediction folder is removed
    # --output onto a disk of its own that fills while the AnnData file is written: one message, no crash
    assert steps["predict_output_full"]["code"] == 2 and not steps["predict_output_full"]["traceback"], steps
    assert steps["predict_output_full"]["last"].startswith("error: the disk is full"), steps["predict_output_full"]
    assert steps["predict_output_full"]["left"] == [], steps["predict_output_full"]
    assert steps["predict_output_again"]["code"] == 0, steps["predict_output_again"]
    assert "prediction.json" in steps["predict_output_again"]["left"], steps["predict_output_again"]
    for step in ("prepare_again", "extract_again", "train_again", "predict_again"):
        assert steps[step]["code"] == 0 and not steps[step]["traceback"], steps[step]
    assert len(steps["predict_again"]["left"]) == 1, steps["predict_again"]
    # full in the middle of training (after a saved state): one message, then the same command resumes and completes
    mid, again = steps["train_mid_full"], steps["train_mid_again"]
    assert mid["code"] == 2 and not mid["traceback"] and not mid["finished"], mid
    assert mid["last"].startswith("error: the disk is full"), mid
    assert again["code"] == 0 and not again["traceback"] and again["finished"], again
    assert again["epochs"] == list(range(1000)), again["epochs"][:20]  # every epoch once: resumed, not interleaved
    assert steps["read_only"]["code"] == 2 and "read-only" in steps["read_only"]["last"]
