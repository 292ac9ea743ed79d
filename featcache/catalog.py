"""What is cached: status, listing and verification of feature stores (`ls`, `info`, `verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.errors import FeatcacheError
from featcache.storage import Location
from featcache.workspace import Workspace


@dataclass
class StoreStatus:
    location: str
    identity: dict
    provenance: dict
    samples: dict[str, tuple[int, int]]  # sample -> (chunks done, chunks total)
    size_bytes: int

    @property
    def complete(self) -> bool:
        return all(d == t for d, t in self.samples.values())

    @property
    def patches(self) -> int:
        return sum(self.identity.get("samples", {}).values())


def _n_chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def store_status(location, storage_options: dict | None = None) -> StoreStatus:
    loc = location if isinstance(location, Location) else Location(location, storage_options)
    meta = loc.read_json("zarr.json")
    if meta is None:
        raise FeatcacheError(f"{loc} is not a feature store (no zarr.json). `featcache ls` lists the stores that exist.")
    ident = meta.get("attributes", {}).get("identity")
    if not ident:
        raise FeatcacheError(f"{loc} has no featcache identity: it was not made by `featcache extract`, or its creation was interrupted.")
    chunk = ident["chunk_patches"]
    samples = {}
    for s, n in ident["samples"].items():
        done = {x for x in loc.listdir(s, "_done") if x.isdigit()}
        samples[s] = (len(done), _n_chunks(n, chunk))
    return StoreStatus(str(loc), ident, meta["attributes"].get("provenance", {}), samples, loc.size_bytes())


def list_stores(ws: Workspace, dataset: str | None = None) -> list[StoreStatus]:
    base = ws.root / "features"
    if not base.is_dir():
        return []
    out = []
    for ds in sorted(p for p in base.iterdir() if p.is_dir()):
        if dataset and ds.name != dataset:
            continue
        for store in sorted(ds.glob("*.zarr")):
            try:
                out.append(store_status(store))
            except FeatcacheError:
                continue
    return out


@dataclass
class VerifyReport:
    location: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    not_extracted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.not_extracted


def verify_store(location, storage_options: dict | None = None) -> VerifyReport:
    """Read back every chunk: checksum, shape and finiteness; name missing or corrupt chunks."""
    loc = location if isinstance(location, Location) else Location(location, storage_options)
    status = store_status(loc)
    ident = status.identity
    chunk = ident["chunk_patches"]
    report = VerifyReport(str(loc))
    root = loc.open_group("r")
    for sample, n in ident["samples"].items():
        if sample not in root:
            report.problems.append(f"{sample}: group missing")
            continue
        done = {int(x) for x in loc.listdir(sample, "_done") if x.isdigit()}
        for name in ("tokens", "pooled"):
            arr = root[sample][name]
            sizes = {"row": ident["grid"][0], "col": ident["grid"][1], "channel": ident["dim"]}
            expect = (n, *(sizes[d] for d in ident["layout"][1:])) if name == "tokens" else (n,)
            if arr.shape[: len(expect)] != tuple(expect):
                report.problems.append(f"{sample}/{name}: shape {arr.shape}, identity says {tuple(expect)}")
                continue
            for c in range(_n_chunks(n, chunk)):
                where = f"{sample}/{name} chunk {c} (patches {c * chunk}-{min((c + 1) * chunk, n) - 1})"
                if c not in done:
                    if name == "tokens":
                        report.not_extracted.append(where.replace("/tokens", ""))
                    continue
                key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
                if not loc.exists(sample, name, key):
                    report.problems.append(f"{where}: chunk file {sample}/{name}/{key} is missing")
                    continue
                try:
                    block = np.asarray(arr[c * chunk : min((c + 1) * chunk, n)])
                except Exception as exc:  # checksum or decompression failure
                    report.problems.append(f"{where}: corrupted ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
                report.checked += 1
                if not np.isfinite(block).all():
                    report.problems.append(f"{where}: {int((~np.isfinite(block)).sum())} non-finite values")
    return report


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

