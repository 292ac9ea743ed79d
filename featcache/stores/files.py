"""Small files every store writes: atomically (temp file + rename), and read back with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from featcache.errors import FeatcacheError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    """A file another process is writing right now through :func:`write_bytes` or :func:`create_exclusive`."""
    return name.startswith(".") and ".tmp-" in name


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` in one step unless it exists; False when someone else made it first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails when the path exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FeatcacheError(f"cannot read {path} ({exc.strerror or exc}).") from None
    except UnicodeDecodeError:
        raise FeatcacheError(f"{path} is not a text file: it is damaged.") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FeatcacheError(f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}).") from None
    if not isinstance(obj, dict):
        raise FeatcacheError(f"{path} is damaged (a JSON object was expected).")
    return obj


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")


def replace_dir(partial: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an older one (which is removed afterwards)."""
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(partial, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, target)
