"""Shared by the benchmark scripts: print a result row and append it to a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(row: dict, out: Path | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
