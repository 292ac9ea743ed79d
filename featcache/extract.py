"""``featcache extract``: run an encoder once over prepared patches; cache its token grids (DESIGN §7).

Store layout, ``features/<dataset>/<encoder>[-random].zarr``::

    <sample>/tokens   float16 (patch, row, col, channel), chunk = a few whole patches, NaN where unwritten
    <sample>/pooled   float32 (patch, channel)
    <sample>/origin   int32 (patch, axis), coordinates copied from patches.zarr
    <sample>/_done/<chunk>   empty marker written after the chunk's tokens and pooled are stored
                             (``_done`` is a zarr group; the markers are plain files in it)

The root group's attributes hold ``identity`` (what determines the values: encoder, weights
sha256 or ``random:<seed>``, input size, normalisation, dtype, prefix tokens dropped, geometry,
dataset fingerprint, layout) and ``provenance`` (library versions, device, batch size). A rerun
resumes: chunks with a marker are skipped, others are (re)computed. A store whose identity differs
is refused unless ``--overwrite``.

Work is planned as fixed groups of whole chunks (one group = one batch), so a resumed or sharded
run computes every patch in the same batch as an uninterrupted run would. Shards (``--shard K/N``
or torchrun's RANK/WORLD_SIZE) take disjoint groups of the same store.

The pipeline keeps the accelerator busy: reader threads decode patch chunks into pinned memory
ahead of time, copies to the device are non-blocking, results come back through non-blocking
copies, and a writer thread compresses and stores them while the next batch runs.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
import zarr

from featcache.encoders import REGISTRY, EncoderSpec, GridEncoder, get_spec
from featcache.errors import FeatcacheError
from featcache.prepare import load_dataset_meta
from featcache.progress import progress
from featcache.provenance import library_versions
from featcache.storage import Location
from featcache.weights import WeightsSource, load_encoder, resolve_weights
from featcache.workspace import Workspace
from featcache.zarrio import DEFAULT_TOKEN_CODEC, TOKEN_CODECS, create_array, write_origins

FEATURES_FORMAT = "featcache.features/1"
# Physical order of the tokens array, by benchmark (benchmarks/RESULTS.md): channel-first
# compresses better (each chunk row is one channel's 32×32 map) and is what a conv decoder reads.
# The dimension names say which is stored; xarray users select by name either way.
LAYOUTS = {"channel-first": ("patch", "channel", "row", "col"), "channel-last": ("patch", "row", "col", "channel")}
DEFAULT_LAYOUT = "channel-first"
CHUNK_BYTES = 8 << 20  # target size of one uncompressed tokens chunk
FP16_MAX = 65504.0


def chunk_patches_for(spec: EncoderSpec) -> int:
    per_patch = spec.grid * spec.grid * spec.dim * 2
    return int(min(64, max(1, round(CHUNK_BYTES / per_patch))))


def store_name(spec: EncoderSpec, source: WeightsSource) -> str:
    return f"{spec.name}-random" if source.is_random else spec.name


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``K/N`` -> (K, N); else torchrun's RANK/WORLD_SIZE; else (0, 1)."""
    if shard:
        try:
            k, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise FeatcacheError(f"--shard {shard!r}: expected K/N, e.g. --shard 0/4") from None
        if not (n >= 1 and 0 <= k < n):
            raise FeatcacheError(f"--shard {shard}: need 0 <= K < N.")
        return k, n
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:1, ...).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return dev


@dataclass
class Group:
    sample: str
    p0: int
    p1: int
    chunks: list[int]


def plan_groups(samples: dict[str, int], chunk: int, batch_size: int) -> list[Group]:
    per_group = max(1, batch_size // chunk)
    groups = []
    for sample, n in samples.items():
        n_chunks = -(-n // chunk)
        for c0 in range(0, n_chunks, per_group):
            cs = list(range(c0, min(c0 + per_group, n_chunks)))
            groups.append(Group(sample, cs[0] * chunk, min((cs[-1] + 1) * chunk, n), cs))
    return groups


@dataclass
class ExtractResult:
    encoder: str
    store: str
    patches_done: int
    patches_total: int
    seconds: float
    complete: bool
    shard: tuple[int, int]
    skipped: int = 0
    tiles_per_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _identity(spec, source, model, meta, chunk, compute, codec, layout) -> dict:
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if spec.kind == "vit" else 0
    return _jsonable({
        "format": FEATURES_FORMAT,
        **spec.describe(),
        "weights": source.identity(),
        "stored_dtype": "float16",
        "pooled_dtype": "float32",
        "compute": compute,
        "prefix_tokens_dropped": prefix,
        "layout": list(LAYOUTS[layout]),
        "chunk_patches": chunk,
        "codec": codec,
        "geometry": meta["geometry"],
        "dataset": meta["dataset"],
        "dataset_fingerprint": meta["fingerprint"],
        "samples": {s: v["n_patches"] for s, v in meta["samples"].items()},
    })


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: stored {json.dumps(old.get(k))[:60]} vs now {json.dumps(new.get(k))[:60]}" for k in keys if old.get(k) != new.get(k)]


def open_or_create_store(loc: Location, identity: dict, provenance: dict, patches_root: zarr.Group,
                         overwrite: bool) -> zarr.Group:
    """Open a matching store for resuming, or create it (idempotently, so shards may race)."""
    meta = loc.read_json("zarr.json")
    if meta is not None:
        old = meta.get("attributes", {}).get("identity")
        if old == identity:
            return loc.open_group("r+")
        if old is not None and not overwrite:
            diff = "; ".join(_differences(old, identity)[:3])
            raise FeatcacheError(
                f"feature store {loc} was made with a different identity ({diff}). Pass --overwrite to "
                "replace it, or write elsewhere with --output."
            )
        if old is None and not overwrite:
            members = set(loc.listdir()) - {"zarr.json"} - set(identity["samples"])
            if members:
                raise FeatcacheError(f"{loc} is a Zarr store that featcache did not make; pass --overwrite or choose another --output.")
        if overwrite and old is not None:
            loc.remove()
    root = loc.open_group("a")
    spec_grid, dim = identity["grid"], identity["dim"]
    chunk = identity["chunk_patches"]
    dims = tuple(identity["layout"])
    sizes = {"row": spec_grid[0], "col": spec_grid[1], "channel": dim}
    shape = [sizes[d] for d in dims[1:]]
    pooled_dim = 2 * dim if identity["pooled"] == "cls+mean" else dim
    for sample, n in identity["samples"].items():
        g = root.require_group(sample)
        try:
            create_array(g, "tokens", shape=(n, *shape), chunks=(chunk, *shape), dtype="float16",
                         dims=dims, fill_value=float("nan"), attributes={"coordinates": "origin"},
                         codec=identity["codec"])
            create_array(g, "pooled", shape=(n, pooled_dim), chunks=(chunk, pooled_dim), dtype="float32",
                         dims=("patch", "channel"), fill_value=float("nan"), attributes={"coordinates": "origin"})
            write_origins(g, patches_root[sample]["origin"][:])
            # Done-markers live in a group of their own so zarr and xarray see a valid hierarchy.
            g.require_group("_done").attrs["description"] = "one empty marker file per fully written chunk"
        except zarr.errors.ContainsArrayError:
            pass  # another shard created it first; the identity check below still applies
    root.attrs.update({"identity": identity, "provenance": provenance})
    return root


def done_chunks(loc: Location, sample: str) -> set[int]:
    return {int(x) for x in loc.listdir(sample, "_done") if x.isdigit()}


def extract(
    dataset: str,
    encoder: str,
    weights: str | None = None,
    workspace: str | os.PathLike | None = None,
    output: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    compile: bool = False,
    precision: str = "auto",
    shard: str | None = None,
    overwrite: bool = False,
    chunk_patches: int | None = None,
    readers: int = 4,
    writers: int | None = None,
    codec: str = DEFAULT_TOKEN_CODEC,
    layout: str = DEFAULT_LAYOUT,
    show_progress: bool = True,
    model: torch.nn.Module | None = None,
    storage_options: dict | None = None,
) -> ExtractResult:
    """Extract one encoder's token grids for every sample of a prepared dataset."""
    t_start = time.perf_counter()
    spec = get_spec(encoder)
    if batch_size < 1:
        raise FeatcacheError("--batch-size must be at least 1.")
    ws = Workspace.resolve(workspace)
    meta = load_dataset_meta(ws, dataset)
    source = resolve_weights(spec, weights)
    shard_k, shard_n = parse_shard(shard)
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise FeatcacheError(f"--precision {precision!r}: use auto, bf16 or fp32.")

    if model is None:
        model, prov = load_encoder(spec, source, dev)
    else:  # a prebuilt network (benchmarks); its weights are whatever it holds
        prov = {"weights": source.identity(), "found_via": "caller"}
    if codec not in TOKEN_CODECS:
        raise FeatcacheError(f"unknown codec {codec!r}; one of {', '.join(TOKEN_CODECS)}.")
    if layout not in LAYOUTS:
        raise FeatcacheError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}.")
    chunk = chunk_patches or chunk_patches_for(spec)
    identity = _identity(spec, source, model, meta, chunk, {"precision": precision, "autocast": precision == "bf16"}, codec, layout)
    provenance = {**prov, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(dev),
                  "batch_size": batch_size, "compile": compile, "libraries": library_versions()}

    loc = Location(output or ws.features_store(dataset, store_name(spec, source)), storage_options)
    patches_root = zarr.open_group(zarr.storage.LocalStore(ws.patches_store(dataset), read_only=True), mode="r")
    root = open_or_create_store(loc, identity, provenance, patches_root, overwrite)

    samples = identity["samples"]
    groups = plan_groups(samples, chunk, batch_size)[shard_k::shard_n]
    done = {s: done_chunks(loc, s) for s in samples}
    todo = [g for g in groups if not set(g.chunks) <= done[g.sample]]
    total = sum(samples.values())
    n_todo = sum(g.p1 - g.p0 for g in todo)

    enc = GridEncoder(spec, model).to(dev).eval()
    runner = torch.compile(enc) if compile else enc
    seconds = 0.0
    if todo:
        with progress(disable=not show_progress) as bar:
            task = bar.add_task(f"{store_name(spec, source)}", total=n_todo, rate="")
            seconds = _run_pipeline(runner, dev, precision, layout == "channel-first", todo, patches_root, root, loc,
                                    batch_size, readers,
                                    writers or min(8, os.cpu_count() or 1),
                                    lambda k, rate: bar.update(task, advance=k, rate=f"{rate:.1f} tiles/s"))
    complete = all(done_chunks(loc, s) >= set(range(-(-n // chunk))) for s, n in samples.items())
    return ExtractResult(
        encoder=store_name(spec, source), store=str(loc), patches_done=n_todo, patches_total=total,
        seconds=time.perf_counter() - t_start, complete=complete, shard=(shard_k, shard_n),
        skipped=sum(g.p1 - g.p0 for g in groups) - n_todo, tiles_per_s=n_todo / seconds if seconds else 0.0,
    )


class BufferPool:
    """A fixed set of reusable host buffers (pinned on CUDA).

    Pinning memory is slow (page-locking hundreds of MB per batch cost more than the batch's
    compute in early measurements), so each buffer is pinned once and handed around. A buffer goes
    back to the pool with the CUDA event after which it is free again.
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            self.free.put((torch.empty(shape, dtype=dtype, pin_memory=pin), None))

    def take(self, stop: list) -> torch.Tensor:
        while True:
            if stop:
                raise stop[0]
            try:
                buf, event = self.free.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        if event is not None:
            event.synchronize()
        return buf

    def give(self, buf: torch.Tensor, event=None) -> None:
        self.free.put((buf, event))


def _run_pipeline(enc, dev, precision, channel_first, todo, patches_root, root, loc, batch_size, readers, writers,
                  on_progress) -> float:
    cuda = dev.type == "cuda"
    images = {g.sample: patches_root[g.sample]["image"] for g in todo}
    out = {s: (root[s]["tokens"], root[s]["pooled"]) for s in images}
    failure: list[BaseException] = []
    most = max(g.p1 - g.p0 for g in todo)
    px = images[todo[0].sample].shape[1:]
    in_pool = BufferPool(readers + 2, (most, *px), torch.uint8, cuda)
    out_pools: dict = {}  # shapes are known after the first batch

    def read(g: Group) -> torch.Tensor:
        buf = in_pool.take(failure)
        buf[: g.p1 - g.p0].copy_(torch.from_numpy(np.ascontiguousarray(images[g.sample][g.p0 : g.p1])))
        return buf

    write_q: queue.Queue = queue.Queue(maxsize=writers + 1)
    lock = threading.Lock()
    t0 = time.perf_counter()
    written = [0]

    def store(item) -> None:
        g, tok_buf, pool_buf, flags, event = item
        n = g.p1 - g.p0
        try:
            if event is not None:
                event.synchronize()
            nonfinite, overflow = (int(v) for v in flags.tolist())
            if nonfinite or overflow:
                raise FeatcacheError(
                    f"sample {g.sample}, patches {g.p0}-{g.p1 - 1}: the encoder produced {nonfinite} non-finite "
                    f"values and {overflow} beyond float16's range (±65504); nothing was stored for them. "
                    "Check the weights, or run with --precision fp32."
                )
            tok_arr, pool_arr = out[g.sample]
            tok_np = tok_buf[:n].numpy()
            k = tok_arr.chunks[0]
            for c in g.chunks:  # chunk by chunk: zarr then encodes our buffer without copying it first
                a, b = c * k, min((c + 1) * k, tok_arr.shape[0])
                tok_arr[a:b] = tok_np[a - g.p0 : b - g.p0]
            pool_arr[g.p0 : g.p1] = pool_buf[:n].numpy()
        finally:
            out_pools["tokens"].give(tok_buf)
            out_pools["pooled"].give(pool_buf)
        for c in g.chunks:
            loc.touch(g.sample, "_done", str(c))  # only now does the chunk count as done
        with lock:
            written[0] += n
            on_progress(n, written[0] / max(time.perf_counter() - t0, 1e-9))

    def writer() -> None:
        while (item := write_q.get()) is not None:
            if failure:
                continue  # drain so the producer never blocks
            try:
                store(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                failure.append(exc)

    wthreads = [threading.Thread(target=writer, name=f"featcache-writer-{i}", daemon=True) for i in range(writers)]
    for w in wthreads:
        w.start()
    pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="featcache-reader")
    pending: deque = deque()
    it = iter(todo)

    def stop_writers() -> None:
        for _ in wthreads:
            while True:
                try:
                    write_q.put(None, timeout=0.5)
                    break
                except queue.Full:
                    if not any(w.is_alive() for w in wthreads):
                        return

    try:
        for g in it:
            pending.append((g, pool.submit(read, g)))
            if len(pending) >= readers:
                break
        while pending:
            if failure:
                raise failure[0]
            g, fut = pending.popleft()
            n = g.p1 - g.p0
            host_in = fut.result()
            x = host_in[:n].to(dev, non_blocking=True)
            in_pool.give(host_in, _event(cuda))  # reusable once the copy has finished
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            tokens, pooled = [], []
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                for i in range(0, n, batch_size):
                    t, p = enc(x[i : i + batch_size])
                    tokens.append(t.float())
                    pooled.append(p.float())
            tok = torch.cat(tokens)
            pol = torch.cat(pooled)
            flags = torch.stack([
                (~torch.isfinite(tok)).sum() + (~torch.isfinite(pol)).sum(),
                (tok.abs() > FP16_MAX).sum(),
            ])
            if channel_first:  # transpose on the device, so the writers read contiguous memory
                tok = tok.permute(0, 3, 1, 2)
            tok = tok.half()
            if not out_pools:
                out_pools["tokens"] = BufferPool(writers + 2, (most, *tok.shape[1:]), torch.float16, cuda)
                out_pools["pooled"] = BufferPool(writers + 2, (most, *pol.shape[1:]), torch.float32, cuda)
            tok_buf = out_pools["tokens"].take(failure)
            pool_buf = out_pools["pooled"].take(failure)
            tok_buf[:n].copy_(tok, non_blocking=cuda)
            pool_buf[:n].copy_(pol, non_blocking=cuda)
            item = (g, tok_buf, pool_buf, flags.to("cpu", non_blocking=cuda), _event(cuda))
            while True:
                if failure:
                    raise failure[0]
                try:
                    write_q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
        stop_writers()
        for w in wthreads:
            w.join()
        if failure:
            raise failure[0]
    except BaseException:
        failure.append(RuntimeError("stopped"))  # readers and writers stop without storing
        pool.shutdown(wait=False, cancel_futures=True)
        stop_writers()
        raise
    pool.shutdown(wait=True)
    return time.perf_counter() - t0


def _event(cuda: bool):
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def all_encoders() -> list[str]:
    return [n for n, s in REGISTRY.items() if not s.test_only]

