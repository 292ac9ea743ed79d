"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import zarr

from featcache.errors import FeatcacheError


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | Path) -> Path:
    s = str(location)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def zarr_store(location: str | Path, storage_options: dict | None = None, read_only: bool = False):
    if is_url(location):
        return zarr.storage.FsspecStore.from_url(
            str(location), storage_options=storage_options or {}, read_only=read_only
        )
    path = local_path(location)
    return zarr.storage.LocalStore(path, read_only=read_only)


class Location:
    """A store root with small side files (markers) reached through fsspec."""

    def __init__(self, location: str | Path, storage_options: dict | None = None):
        self.raw = str(location)
        self.storage_options = storage_options or {}
        if is_url(location):
            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.raw, **self.storage_options)
            except (ImportError, ValueError) as exc:
                protocol = self.raw.split("://", 1)[0]
                raise FeatcacheError(
                    f"cannot open {self.raw}: {exc}. Install the fsspec backend for {protocol}:// "
                    f"(e.g. `pip install s3fs` for s3://, `gcsfs` for gs://)."
                ) from None
        else:
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self.root = str(local_path(location).absolute())

    def __str__(self) -> str:
        return self.raw

    def key(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.key(*parts))

    def touch(self, *parts: str) -> None:
        self.fs.pipe_file(self.key(*parts), b"")

    def listdir(self, *parts: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(*parts), detail=False)]
        except FileNotFoundError:
            return []

    def read_json(self, *parts: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.key(*parts)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def size_bytes(self) -> int:
        try:
            return int(self.fs.du(self.root, total=True))
        except FileNotFoundError:
            return 0

    def open_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(zarr_store(self.raw, self.storage_options, read_only=(mode == "r")), mode=mode)
