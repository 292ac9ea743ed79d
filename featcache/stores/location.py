"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).

A URL is opened with the storage options of ``$FEATCACHE_STORAGE_OPTIONS`` (a JSON object handed to
the fsspec backend, e.g. ``{"anon": false, "client_kwargs": {"region_name": "eu-west-1"}}``) unless
the caller gives its own; credentials and endpoints otherwise come from the backend's own environment
(for ``s3://``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``).
The first time a process names a bucket, one listing checks that it exists and can be read with
those credentials, so that a wrong bucket, key or endpoint is one clear error before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import zarr

from featcache.errors import FeatcacheError
from featcache.stores.files import json_object


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | Path) -> Path:
    s = str(location)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


OPTIONS_ENV_VAR = "FEATCACHE_STORAGE_OPTIONS"
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")
_reached: set[tuple] = set()  # (protocol, bucket, options): buckets this process has checked


def env_storage_options() -> dict:
    """The storage options of ``$FEATCACHE_STORAGE_OPTIONS`` (a JSON object), else none."""
    text = os.environ.get(OPTIONS_ENV_VAR, "").strip()
    if not text:
        return {}
    return json_object(text, f"${OPTIONS_ENV_VAR}", "set it to a JSON object of fsspec storage options.")


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
        self.raw = str(location).rstrip("/") if is_url(location) else str(location)
        if storage_options is None:
            storage_options = env_storage_options() if is_url(location) else {}
        if self.raw.split("://", 1)[0] in OBJECT_STORES:
            # no cached listings: other processes (shards, verify, a resumed run) add and remove objects meanwhile
            storage_options = {"use_listings_cache": False, **storage_options}
        self.storage_options = storage_options
        if is_url(location):
            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.raw, **self.storage_options)
            except (ImportError, ValueError) as exc:
                protocol = self.raw.split("://", 1)[0]
                raise FeatcacheError(
                    f"cannot open {self.raw}: {exc}. Install the fsspec backend for {protocol}:// "
                    f"(e.g. `pip install s3fs` for s3://, `gcsfs` for gs://)."
                ) from None
            self._check_bucket()
        else:
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self.root = str(local_path(location).absolute())

    def __str__(self) -> str:
        return self.raw

    def _check_bucket(self) -> None:
        """List the bucket once per process: a missing bucket, wrong credentials or an endpoint that cannot be
        reached become one error naming the fix, before any read or write."""
        protocol = self.raw.split("://", 1)[0]
        bucket = self.root.split("/", 1)[0]
        key = (protocol, bucket, json.dumps(self.storage_options, sort_keys=True, default=str))
        if protocol not in OBJECT_STORES or key in _reached:
            return
        where = f"{protocol}://{bucket}"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        at = f" at {endpoint}" if endpoint and protocol.startswith("s3") else ""
        try:
            self.fs.ls(bucket, detail=False)
        except FileNotFoundError:
            raise FeatcacheError(
                f"bucket {where} does not exist{at}; create it first, or name an existing bucket "
                "in --features-root / $FEATCACHE_FEATURES_ROOT."
            ) from None
        except PermissionError as exc:
            raise FeatcacheError(
                f"access to {where}{at} was refused ({str(exc)[:100]}); check the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE for s3://, or ${OPTIONS_ENV_VAR})."
            ) from None
        except Exception as exc:  # noqa: BLE001 - each backend has its own connection errors
            raise FeatcacheError(
                f"cannot reach {where}{at} ({type(exc).__name__}: {str(exc)[:120]}); check the endpoint "
                f"(AWS_ENDPOINT_URL for s3://, or endpoint options in ${OPTIONS_ENV_VAR}) and the network."
            ) from None
        _reached.add(key)

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
