"""Files every store writes, and read back with clear errors.

Small files are written atomically (temp file + rename: :func:`write_bytes`). Artefacts that take longer
to build — a dataset, a run's prediction store, a slide's prediction folder, an exported .h5ad — are
built under a hidden name beside their place and moved there whole (:class:`Staged`), so an interrupted
or failed command never leaves one half-written where it looks finished.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import time
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
    try:
        with open(tmp, "wb") as fh:  # a full disk fails here: the temp file goes too
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
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
    return json_object(text, str(path), "the file is damaged.")


def json_object(text: str, name: str, fix: str) -> dict:
    """``text`` (the content of ``name``) as a JSON object; otherwise one error naming ``name``, ending in ``fix``."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FeatcacheError(f"{name} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(obj, dict):
        raise FeatcacheError(f"{name} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")


def replace_dir(partial: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an older one (removed afterwards; put back if the move fails)."""
    if not target.exists():
        os.replace(partial, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    try:
        os.replace(partial, target)
    except BaseException:
        os.replace(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


PARTIAL = ".partial-"
STALE_ELSEWHERE_S = 7 * 24 * 3600
"""Age after which a partial this host cannot judge (another host's, on a shared filesystem, or one named before
partials carried their host) is removed: no featcache write runs for a week, while a prepare can run for hours."""


def this_host() -> str:
    """This host's name as a partial carries it: no ``-`` (it separates the fields), at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "unknown"


def partial_name(name: str, pid: int | None = None, host: str | None = None) -> str:
    """``.<name>.partial-<host>-<pid>-<id>``: the hidden name a writer of ``name`` builds under, its owner named
    so that only the owner's host judges whether the owner is gone."""
    return f".{name}{PARTIAL}{host or this_host()}-{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"


def _stale_partial(path: Path, owner: str) -> bool:
    """Whether a partial whose name holds ``owner`` (``<host>-<pid>-<id>``) was left by a writer that is gone: a
    process of this host that is no longer alive; anything else only once older than :data:`STALE_ELSEWHERE_S`."""
    host, _, rest = owner.partition("-")
    pid = rest.split("-", 1)[0]
    if host == this_host() and pid.isdigit():
        return not process_alive(int(pid))
    try:
        return time.time() - path.lstat().st_mtime > STALE_ELSEWHERE_S
    except FileNotFoundError:
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_partials(folder: Path, name: str) -> None:
    """Remove what killed writers of ``name`` left in ``folder``: the hidden partials of processes that are
    gone (:func:`partial_name`; another host's are left to it, :func:`_stale_partial`) and older copies a
    replacement set aside (``.<name>.old-<id>``)."""
    prefix = f".{name}{PARTIAL}"
    for p in Path(folder).glob(glob.escape(prefix) + "*"):
        if _stale_partial(p, p.name[len(prefix) :]):
            _remove(p)
    for p in Path(folder).glob(glob.escape(f".{name}.old-") + "*"):
        _remove(p)


class Staged:
    """A folder or file built under a hidden name beside ``target`` and moved into place whole.

    The hidden path is ``.<name>.partial-<host>-<pid>-<id>`` (:func:`partial_name`: the owner's host and process
    id, so a later writer on that host knows a partial whose owner died and removes it). :meth:`commit` moves it into place, replacing an older
    target without ever leaving it missing; :meth:`abort` removes it. As a context manager it yields the
    hidden path, commits when the block ends and aborts when it raises (or when the commit fails).
    Make one with :func:`staged_dir` or :func:`staged_file`.
    """

    def __init__(self, target: Path, folder: bool, replace: bool = True):
        self.target, self.folder, self.done, self.replace = Path(target), folder, False, replace
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.target.parent, self.target.name)
        self.path = self.target.with_name(partial_name(self.target.name))
        if folder:
            self.path.mkdir()

    def commit(self) -> None:
        """Move into place; with ``replace=False`` a target that appeared meanwhile (another process finished
        first) is kept and this one is removed, with one error: nothing existing is overwritten unless asked."""
        if not self.replace and self.target.exists():
            self.abort()
            raise FeatcacheError(
                f"{self.target} was created by another process while this one was writing it; it is kept as that "
                "process wrote it. Run the command again with --overwrite to replace it."
            )
        try:
            if self.folder:
                replace_dir(self.path, self.target)
            else:
                os.replace(self.path, self.target)
        except BaseException:
            self.abort()
            raise
        self.done = True

    def abort(self) -> None:
        _remove(self.path)
        self.done = True

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, *_) -> None:
        if self.done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class StagedWriter:
    """An artefact written piece by piece in a hidden folder (:func:`staged_dir`): :meth:`commit` finishes it
    (:meth:`_finish`) and moves it into place; leaving the ``with`` block without a commit removes it, and so
    does a failure while ``skeleton`` lays out its empty files (a full disk leaves nothing behind)."""

    def __init__(self, target: Path, replace: bool, skeleton):
        self.staged = staged_dir(target, replace=replace)
        self.partial = self.staged.path
        try:
            skeleton()
        except BaseException:
            self.abort()
            raise

    def _finish(self, meta: dict) -> None:
        """Write what completes the artefact (its metadata file last) into :attr:`partial`."""
        raise NotImplementedError

    def commit(self, meta: dict) -> None:
        self._finish(meta)
        self.staged.commit()

    def abort(self) -> None:
        self.staged.abort()

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        if not self.staged.done:
            self.abort()


def staged_dir(target: Path, replace: bool = True) -> Staged:
    """A hidden folder for ``target`` (made now, empty): ``with staged_dir(path) as tmp: ...`` fills it."""
    return Staged(target, folder=True, replace=replace)


def staged_file(target: Path) -> Staged:
    """A hidden file name for ``target`` (nothing made yet): ``with staged_file(path) as tmp: ...`` writes it."""
    return Staged(target, folder=False)
