"""The feature store: ``features/<dataset>/<encoder>[-random].zarr`` (docs/design.md §7). This file is its format.

::

    zarr.json                root attributes: ``identity`` (what determines the values) and ``provenance``
    <sample>/tokens          float16, (patch, channel, row, col) by default; NaN where not yet written
    <sample>/tokens_<N>      float16, as ``tokens``: the grid after block N (``extract --layers N``), only when asked
    <sample>/pooled          float32 (patch, channel); (patch, pooled_channel) where its width is not the tokens'
    <sample>/origin          int32 (patch, axis), copied from the dataset's patches.zarr
    <sample>/_done/<chunk>   empty marker, written after the chunk's tokens and pooled are stored

The identity names the encoder and its kwargs, the weights (sha256 or ``random:<seed>``), input
size, normalisation, stored dtype, compute precision, prefix tokens dropped, geometry (with the pixels
per bin and patch size of the rendering the encoder read), dataset fingerprint, layout, codec and
chunking, and (only when ``--layers`` was given) the intermediate
layers it holds: ``layers`` = {"tokens_<N>": {"layer": N, "grid": [h, w], "dim": c, "module": timm's name}}. A store
extracted with other layers is another identity: adding a layer means ``--overwrite`` (or another ``--output``). A store is created by writing its root ``zarr.json``
with the identity in one exclusive step, so a folder either is a featcache store (it has the
identity) or is not one; only the former is ever resumed or removed. A chunk counts as done
only once its marker exists.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, geometry_for
from featcache.stores.files import create_exclusive, is_temporary, write_bytes
from featcache.stores.location import Location, is_url, local_path, zarr_store
from featcache.stores.zarrio import TOKEN_CODECS, create_array, read_error, write_origins

FEATURES_FORMAT = "featcache.features/1"
RANDOM_SUFFIX = "-random"
# Physical order of the tokens array, by benchmark (benchmarks/RESULTS.md): channel-first
# compresses better (each chunk row is one channel's 32×32 map) and is what a conv decoder reads.
# The dimension names say which is stored; xarray users select by name either way.
LAYOUTS = {"channel-first": ("patch", "channel", "row", "col"), "channel-last": ("patch", "row", "col", "channel")}
DEFAULT_LAYOUT = "channel-first"
CHANNEL_FIRST = LAYOUTS["channel-first"]
CHUNK_BYTES = 8 << 20  # target size of one uncompressed tokens chunk
DONE = "_done"


def all_finite(block: np.ndarray) -> bool:
    """True when no value is NaN or ±inf. Reads the exponent bits of IEEE floats as integers: ten times
    faster than ``np.isfinite`` on float16, whose arithmetic numpy emulates (a check of every streamed batch)."""
    bits = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}
    if block.dtype.kind != "f" or block.size == 0:
        return True
    if block.dtype.itemsize not in bits or not block.flags.c_contiguous:
        return bool(np.isfinite(block).all())
    kind, exponent = bits[block.dtype.itemsize]
    return int(np.bitwise_and(block.view(kind), kind(exponent)).max()) != exponent


def store_name(encoder: str, random: bool, seed: int = 0) -> str:
    """The store's name in the workspace (docs/design.md §7): ``<encoder>`` for pretrained weights,
    ``<encoder>-random`` for ``random:0`` and ``<encoder>-random-s<seed>`` for the other seeds."""
    if not random:
        return encoder
    return f"{encoder}{RANDOM_SUFFIX}" + (f"-s{seed}" if seed else "")


def split_store_name(name: str) -> tuple[str, bool, int]:
    """``uni2h-random`` -> (uni2h, True, 0); ``uni2h-random-s2`` -> (uni2h, True, 2); ``uni2h`` -> (uni2h, False, 0)."""
    m = re.fullmatch(rf"(.+){RANDOM_SUFFIX}(?:-s(\d+))?", name)
    return (m[1], True, int(m[2] or 0)) if m else (name, False, 0)


def chunk_patches_for(grid: int, dim: int) -> int:
    """Patches per stored chunk: about CHUNK_BYTES of float16 tokens, between 1 and 64."""
    return int(min(64, max(1, round(CHUNK_BYTES / (grid * grid * dim * 2)))))


def make_identity(
    *,
    spec: dict,
    weights: str,
    prefix_tokens: int,
    dataset: dict,
    chunk: int,
    compute: dict,
    codec: str,
    layout: str,
    layers: dict[int, dict] | None = None,
    px_per_bin: int = GEOMETRY.px_per_bin,
) -> dict:
    """Everything that determines a store's values (``spec`` is the encoder's ``describe()``; ``layers`` the
    intermediate layers' shapes, ``encoders.check_layers``: absent when none, so older stores keep their identity).

    The geometry is the dataset's patching (bins per patch, stride, min tissue) at the rendering the encoder
    read: ``px_per_bin`` and ``patch_px`` are the encoder's (14 and 448, or 16 and 512), so a store of a 14 px
    encoder has the identity it always had."""
    if codec not in TOKEN_CODECS:
        raise FeatcacheError(f"unknown codec {codec!r}; one of {', '.join(TOKEN_CODECS)}.")
    if layout not in LAYOUTS:
        raise FeatcacheError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}.")
    return json.loads(
        json.dumps(
            {
                "format": FEATURES_FORMAT,
                **spec,
                "weights": weights,
                "stored_dtype": "float16",
                "pooled_dtype": "float32",
                "compute": compute,
                "prefix_tokens_dropped": prefix_tokens,
                "layout": list(LAYOUTS[layout]),
                "chunk_patches": chunk,
                "codec": codec,
                "geometry": {**dataset["geometry"], **geometry_for(px_per_bin).to_json()},
                "dataset": dataset["dataset"],
                "dataset_fingerprint": dataset["fingerprint"],
                "samples": {s: v["n_patches"] for s, v in dataset["samples"].items()},
                **(
                    {"layers": {f"tokens_{n}": {"layer": n, **shape} for n, shape in sorted(layers.items())}}
                    if layers
                    else {}
                ),
            }
        )
    )


def layer_arrays(identity: dict) -> dict[str, dict]:
    """The store's intermediate-layer arrays: {"tokens_<N>": {"layer", "grid", "dim", "module"}}; {} when none."""
    return dict(identity.get("layers") or {})


def stored_layers(identity: dict) -> list[int]:
    return [int(v["layer"]) for v in layer_arrays(identity).values()]


def array_dims(identity: dict, name: str) -> tuple[str, ...]:
    """The dimension names of a token-grid array: the layout's, except that a layer whose grid or width is not the
    final grid's (a CNN's earlier stage) names those dimensions ``<dim>_<N>`` (one xarray Dataset has one size per
    dimension name). :func:`token_dims` names them back."""
    dims = tuple(identity["layout"])
    if name == "tokens":
        return dims
    grids = token_arrays(identity)
    (h, w), c = grids[name]
    (h0, w0), c0 = grids["tokens"]
    own, final = {"row": h, "col": w, "channel": c}, {"row": h0, "col": w0, "channel": c0}
    layer = layer_arrays(identity)[name]["layer"]
    return tuple(d if d == "patch" or own[d] == final[d] else f"{d}_{layer}" for d in dims)


def token_dims(arr: xr.DataArray) -> xr.DataArray:
    """A layer's grid with the plain dimension names (patch, channel, row, col), whatever the store called them."""
    return arr.rename({d: re.sub(r"_\d+$", "", d) for d in arr.dims if re.fullmatch(r"(row|col|channel)_\d+", d)})


def token_arrays(identity: dict) -> dict[str, tuple[list[int], int]]:
    """Every token-grid array: name -> (grid [h, w], channels); ``tokens`` first."""
    out = {"tokens": (list(identity["grid"]), int(identity["dim"]))}
    out.update({name: (list(v["grid"]), int(v["dim"])) for name, v in layer_arrays(identity).items()})
    return out


def _skeleton(identity: dict, origins: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The files of an empty store of this identity (all but the root zarr.json): relative path -> bytes."""
    chunk, dims = identity["chunk_patches"], tuple(identity["layout"])
    pooled_dim = 2 * identity["dim"] if identity["pooled"] == "cls+mean" else identity["dim"]
    # xarray needs one size per dimension name: a pooled vector wider than a token (cls ⊕ mean) has its own.
    pooled_dims = ("patch", "channel" if pooled_dim == identity["dim"] else "pooled_channel")
    with tempfile.TemporaryDirectory(prefix="featcache-skeleton-") as tmp:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        for sample, n in identity["samples"].items():
            g = root.create_group(sample)
            for name, (grid, dim) in token_arrays(identity).items():  # every grid: one layout, dtype and chunking
                sizes = {"row": grid[0], "col": grid[1], "channel": dim}
                shape = [sizes[d] for d in dims[1:]]
                create_array(
                    g,
                    name,
                    shape=(n, *shape),
                    chunks=(chunk, *shape),
                    dtype="float16",
                    dims=array_dims(identity, name),
                    fill_value=float("nan"),
                    attributes={"coordinates": "origin"},
                    codec=identity["codec"],
                )
            create_array(
                g,
                "pooled",
                shape=(n, pooled_dim),
                chunks=(chunk, pooled_dim),
                dtype="float32",
                dims=pooled_dims,
                fill_value=float("nan"),
                attributes={"coordinates": "origin"},
            )
            write_origins(g, origins[sample])
            g.create_group(DONE).attrs["description"] = "one empty marker file per fully written chunk"
        base = Path(tmp)
        return {
            str(p.relative_to(base)): p.read_bytes()
            for p in sorted(base.rglob("*"))
            if p.is_file() and p.relative_to(base) != Path("zarr.json")
        }


def _layers_text(identity: dict) -> str:
    layers = stored_layers(identity)
    return f"intermediate layers {', '.join(map(str, layers))}" if layers else "no intermediate layers"


def _n_chunks(identity: dict, sample: str) -> int:
    return -(-identity["samples"][sample] // identity["chunk_patches"])


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: stored {json.dumps(old.get(k))[:60]} vs now {json.dumps(new.get(k))[:60]}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


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


@dataclass
class VerifyReport:
    location: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    not_extracted: list[str] = field(default_factory=list)
    bad_chunks: dict[str, set[int]] = field(default_factory=dict)  # sample -> chunk indices to redo
    repaired: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.not_extracted


class FeatureStore:
    """One encoder's cached token grids for one dataset, at a local path or an fsspec URL.

    Per sample: ``tokens`` float16 (patch, channel, row, col), ``pooled`` float32 (patch, channel),
    ``origin``, and a done-marker per fully written chunk; the root holds the store's identity
    (encoder, weights, geometry, dataset fingerprint, layout, codec) and provenance.

    Examples
    --------
    >>> store = Workspace.resolve().feature_store("demo", "uni2h")
    >>> store.status().complete
    >>> store.tokens("P1").sel(channel=0)          # (patch, row, col), lazily
    """

    def __init__(
        self,
        location: str | Path,
        storage_options: dict | None = None,
        *,
        dataset: str | None = None,
        encoder: str | None = None,
        random: bool | None = None,
        seed: int = 0,
    ):
        self.loc = Location(location, storage_options)
        self.dataset, self.encoder, self.random = dataset, encoder, random  # known for workspace stores
        self.seed = seed  # the random-init seed of a workspace store

    @property
    def make_hint(self) -> str:
        """The command that makes (or finishes) this store."""
        if self.dataset is None:
            return "featcache extract --dataset DATASET --encoder ENCODER --output " + str(self.loc)
        return f"featcache extract --dataset {self.dataset} --encoder {self.encoder}" + (
            (f" --weights random:{self.seed}" if self.seed else " --weights random") if self.random else ""
        )

    def __str__(self) -> str:
        return str(self.loc)

    @property
    def name(self) -> str:
        return str(self.loc).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")

    @property
    def path(self) -> Path | None:
        """The local folder, or None for a URL."""
        return None if is_url(self.loc.raw) else local_path(self.loc.raw)

    # ------------------------------------------------------------------ identity
    def _root_meta(self) -> dict | None:
        return self.loc.read_json("zarr.json")

    def exists(self) -> bool:
        return self._root_meta() is not None

    def has_identity(self) -> bool:
        """A featcache feature store (complete or not), not merely some folder or Zarr store."""
        return bool((self._root_meta() or {}).get("attributes", {}).get("identity"))

    @property
    def identity(self) -> dict:
        """What the store holds: encoder and kwargs, weights (sha256 or ``random:<seed>``), input size,
        normalisation, dtype, precision, prefix tokens dropped, geometry, dataset fingerprint, samples
        (patches each), chunking, layout, codec. Raises FeatcacheError when this is not a featcache store."""
        meta = self._root_meta()
        if meta is None:
            raise FeatcacheError(
                f"{self.loc} is not a feature store (no zarr.json). `featcache ls` lists the stores that exist."
            )
        ident = meta.get("attributes", {}).get("identity")
        if not ident:
            raise FeatcacheError(f"{self.loc} has no featcache identity: it was not made by `featcache extract`.")
        return ident

    @property
    def provenance(self) -> dict:
        return (self._root_meta() or {}).get("attributes", {}).get("provenance", {})

    def open_or_create(
        self, identity: dict, provenance: dict, origins: dict[str, np.ndarray], overwrite: bool = False
    ) -> zarr.Group:
        """Open a store of this identity for resuming, or create it; shards may race here safely.

        A store of another identity is replaced only with ``overwrite``; anything that is not a
        featcache store (a user's folder, another Zarr store) is never adopted or removed.
        """
        meta = self._root_meta()
        if meta is None:
            self._refuse_foreign_folder()
        else:
            old = meta.get("attributes", {}).get("identity")
            if not old:
                raise FeatcacheError(
                    f"{self.loc} is a Zarr store that featcache did not make; it is left as it is. "
                    "Choose another --output."
                )
            if old != identity:
                if not overwrite and old.get("layers") != identity.get("layers"):
                    raise FeatcacheError(
                        f"feature store {self.loc} holds {_layers_text(old)}, and this extraction asks for "
                        f"{_layers_text(identity)}. The layers are part of a store's identity: pass --overwrite to "
                        "extract the store again with these layers (every array is recomputed), give the store's "
                        f"own --layers to resume it ({','.join(map(str, stored_layers(old))) or 'none'}), or write "
                        "elsewhere with --output."
                    )
                if not overwrite:
                    diff = "; ".join(_differences(old, identity)[:3])
                    raise FeatcacheError(
                        f"feature store {self.loc} was made with a different identity ({diff}). "
                        "Pass --overwrite to replace it, or write elsewhere with --output."
                    )
                self.remove()
        self._create_root(identity)
        root = self._open_root(identity)
        self._create_arrays(root, identity, origins)
        self.set_provenance(provenance)
        return root

    def _refuse_foreign_folder(self) -> None:
        fs, root = self.loc.fs, self.loc.root
        if fs.exists(root) and not fs.isdir(root):
            raise FeatcacheError(f"{self.loc} is a file, not a folder; choose another --output.")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
        # a racing shard may be writing its zarr.json (a hidden temporary file) or have written it since we
        # looked: neither is a foreign folder, and _open_root then checks the identity it wrote
        if names and "zarr.json" not in names and not all(is_temporary(n) for n in names):
            raise FeatcacheError(
                f"{self.loc} is a folder that featcache did not make (it has files and no feature-store "
                "identity); it is left as it is. Choose a new or empty folder for --output."
            )

    def _create_root(self, identity: dict) -> None:
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {"identity": identity, "provenance": {}}}
        data = json.dumps(meta, indent=2).encode()
        if self.path is not None:
            create_exclusive(self.path / "zarr.json", data)  # a racing shard's copy is equal, or refused below
        elif not self.loc.exists("zarr.json"):
            self.loc.fs.pipe_file(self.loc.key("zarr.json"), data)

    def _open_root(self, identity: dict) -> zarr.Group:
        if self.identity != identity:
            raise FeatcacheError(
                f"another process created {self.loc} with a different identity just now; rerun "
                "with the same options as that process, or choose another --output."
            )
        return zarr.open_group(zarr_store(self.loc.raw, self.loc.storage_options), mode="r+")

    def _create_arrays(self, root: zarr.Group, identity: dict, origins: dict[str, np.ndarray]) -> None:
        """Every group's and array's metadata and the origins, each file written whole (atomically) when it
        is absent or differs: racing shards write the same bytes, and a full disk leaves no half-written file."""
        for key, data in _skeleton(identity, origins).items():
            if self.path is not None:
                target = self.path / key
                if not target.is_file() or target.read_bytes() != data:
                    write_bytes(target, data)
            elif not self.loc.exists(key) or self.loc.fs.cat_file(self.loc.key(key)) != data:
                self.loc.fs.pipe_file(self.loc.key(key), data)

    def set_provenance(self, provenance: dict) -> None:
        """Replace the root's provenance in one atomic write (concurrent shards read zarr.json meanwhile)."""
        meta = self._root_meta()
        meta.setdefault("attributes", {})["provenance"] = json.loads(json.dumps(provenance))
        data = json.dumps(meta, indent=2).encode()
        if self.path is not None:
            write_bytes(self.path / "zarr.json", data)
        else:
            self.loc.fs.pipe_file(self.loc.key("zarr.json"), data)

    def remove(self) -> None:
        """Delete the store; only a folder whose root carries a featcache identity is ever removed."""
        _ = self.identity
        self.loc.remove()

    # ------------------------------------------------------------------ chunks
    def group(self, mode: str = "r") -> zarr.Group:
        return self.loc.open_group(mode)

    def n_chunks(self, sample: str) -> int:
        return _n_chunks(self.identity, sample)

    def done_chunks(self, sample: str) -> set[int]:
        return {int(x) for x in self.loc.listdir(sample, DONE) if x.isdigit()}

    def mark_done(self, sample: str, chunk: int) -> None:
        self.loc.touch(sample, DONE, str(chunk))

    def unmark(self, sample: str, chunk: int) -> None:
        key = self.loc.key(sample, DONE, str(chunk))
        if self.loc.fs.exists(key):
            self.loc.fs.rm(key)

    def status(self) -> StoreStatus:
        """Completeness per sample (done chunks of all), identity, provenance and size on disk.

        Returns
        -------
        StoreStatus
            ``complete`` (every chunk of every sample done), ``patches`` done, ``samples``
            {sample: (done chunks, chunks)}, ``size_bytes``.
        """
        ident = self.identity
        samples = {s: (len(self.done_chunks(s)), _n_chunks(ident, s)) for s in ident["samples"]}
        return StoreStatus(str(self.loc), ident, self.provenance, samples, self.loc.size_bytes())

    def is_complete(self) -> bool:
        return self.exists() and self.status().complete

    # ------------------------------------------------------------------ reading
    def open_sample(self, sample: str) -> xr.Dataset:
        """One sample's arrays, lazily (Dask-backed).

        Parameters
        ----------
        sample : str

        Returns
        -------
        xarray.Dataset
            ``tokens`` float16 in the stored order (see ``identity["layout"]``), ``pooled`` float32
            (patch, channel), ``origin`` (patch, axis).

        Notes
        -----
        Opened without CF masking: the arrays' fill value is NaN, so masking would change nothing, but it runs
        an elementwise pass over every float16 chunk that made reads 3.5× slower (benchmarks/RESULTS.md).
        """
        if sample not in self.identity["samples"]:
            raise FeatcacheError(f"feature store {self.loc} has no sample {sample!r}.")
        store = zarr_store(self.loc.raw, self.loc.storage_options, read_only=True)
        return xr.open_zarr(store, group=sample, consolidated=False, mask_and_scale=False)

    def tokens(self, sample: str, order=CHANNEL_FIRST, layer: int | None = None) -> xr.DataArray:
        """One sample's token grids, lazily (Dask-backed).

        Parameters
        ----------
        sample : str
        order : tuple of str
            Dimension order wanted, e.g. ``("patch", "row", "col", "channel")``; the stored order is
            read whichever this is (xarray transposes lazily).
        layer : int, optional
            An intermediate layer the store was extracted with (``tokens_<layer>``); None: the final grid.

        Returns
        -------
        xarray.DataArray
            float16 token grids with the patch origins as a coordinate.
        """
        self.check_layer(layer)
        name = "tokens" if layer is None else f"tokens_{layer}"
        return token_dims(self.open_sample(sample)[name]).transpose(*order)

    def check_layer(self, layer: int | None, hint: str | None = None) -> None:
        """Refuse a layer the store was not extracted with, naming the command that extracts it."""
        if layer is None or f"tokens_{layer}" in layer_arrays(self.identity):
            return
        have = stored_layers(self.identity)
        make = self.make_hint + f" --layers {','.join(map(str, sorted({*have, layer})))} --overwrite"
        raise FeatcacheError(
            f"feature store {self.loc} has no layer {layer} (tokens_{layer}); it holds "
            f"{_layers_text(self.identity)}. Extract it with `{hint or make}`."
        )

    def read_error(self, sample: str, name: str, idx, exc: Exception) -> FeatcacheError:
        """The error for a damaged chunk of this store, naming the store, array and chunk, and the repair."""
        arr = self.group("r")[sample][name]
        return read_error(
            arr,
            f"{self.loc}/{sample}/{name}",
            idx,
            exc,
            f"repair it with `featcache verify --repair {self.loc}`, then rerun `{self.make_hint}`.",
        )

    # ------------------------------------------------------------------ verify
    def verify(self, repair: bool = False) -> VerifyReport:
        """Read back every done chunk and report what is wrong.

        Parameters
        ----------
        repair : bool
            Drop the done-markers of bad chunks, so that rerunning ``featcache extract`` recomputes
            exactly those.

        Returns
        -------
        VerifyReport
            ``ok``, ``problems`` (corrupted, missing or non-finite chunks, by name), ``not_extracted``
            and ``checked`` (chunks read).
        """
        ident = self.identity
        chunk = ident["chunk_patches"]
        report = VerifyReport(str(self.loc))
        root = self.group("r")
        for sample, n in ident["samples"].items():
            if sample not in root:
                report.problems.append(f"{sample}: group missing")
                continue
            done = self.done_chunks(sample)
            for name in ("tokens", *layer_arrays(ident), "pooled"):
                if name not in root[sample]:
                    report.problems.append(f"{sample}/{name}: array missing (extract the store again with --overwrite)")
                    continue
                self._verify_array(report, root[sample][name], sample, name, n, chunk, done, ident)
            self._verify_origin(report, root[sample], sample, n)
        if repair:
            for sample, chunks in report.bad_chunks.items():
                for c in chunks:
                    self.unmark(sample, c)
                    report.repaired += 1
        return report

    def _verify_origin(self, report, group, sample: str, n: int) -> None:
        """The patch origins (written whole with the store's skeleton): present, readable, (n, 2)."""
        fix = "extract the store again with --overwrite"
        if "origin" not in group:
            report.problems.append(f"{sample}/origin: array missing ({fix})")
            return
        try:
            origin = np.asarray(group["origin"][:])
            report.checked += 1
        except Exception as exc:  # noqa: BLE001 - checksum or decompression failure
            report.problems.append(f"{sample}/origin: corrupted ({type(exc).__name__}: {str(exc)[:80]}; {fix})")
            return
        if origin.shape != (n, 2):
            report.problems.append(f"{sample}/origin: shape {origin.shape}, identity says {(n, 2)} ({fix})")

    def _verify_array(self, report, arr, sample, name, n, chunk, done, ident) -> None:
        grids = token_arrays(ident)
        if name in grids:
            (h, w), dim = grids[name]
            sizes = {"row": h, "col": w, "channel": dim}
            expect = (n, *(sizes[d] for d in ident["layout"][1:]))
        else:
            expect = (n,)
        if arr.shape[: len(expect)] != tuple(expect):
            report.problems.append(f"{sample}/{name}: shape {arr.shape}, identity says {tuple(expect)}")
            return
        for c in range(-(-n // chunk)):
            where = f"{sample}/{name} chunk {c} (patches {c * chunk}-{min((c + 1) * chunk, n) - 1})"
            if c not in done:
                if name == "tokens":
                    report.not_extracted.append(where.replace("/tokens", ""))
                continue
            key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
            bad = None
            if not self.loc.exists(sample, name, key):
                bad = f"{where}: chunk file {sample}/{name}/{key} is missing"
            else:
                try:
                    block = np.asarray(arr[c * chunk : min((c + 1) * chunk, n)])
                    report.checked += 1
                    if not all_finite(block):
                        bad = f"{where}: {int((~np.isfinite(block)).sum())} non-finite values"
                except Exception as exc:  # noqa: BLE001 - checksum or decompression failure
                    bad = f"{where}: corrupted ({type(exc).__name__}: {str(exc)[:80]})"
            if bad:
                report.problems.append(bad)
                report.bad_chunks.setdefault(sample, set()).add(c)
