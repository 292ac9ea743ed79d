"""Which processes a test left behind: any still running whose command line names the test's own folder."""

from __future__ import annotations

import os
from pathlib import Path


def left_behind(marker: str | Path) -> list[str]:
    """Command lines of live processes (not this one) that mention ``marker`` (a test's tmp_path)."""
    marker, found = str(marker).encode(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(proc.name + ": " + cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found
