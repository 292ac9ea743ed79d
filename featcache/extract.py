"""``featcache extract``: run an encoder once over prepared patches; cache its token grids.

The store's format (layout, identity, done-markers) belongs to featcache/stores/features.py;
this module plans the work and keeps the accelerator busy.

Work is planned as fixed groups of whole chunks (one group = one batch), so a resumed or sharded
run computes every patch in the same batch as an uninterrupted run would. Shards (``--shard K/N``
or torchrun's RANK/WORLD_SIZE) take disjoint groups of the same store.

The pipeline: a :class:`~featcache.streams.Prefetcher` decodes patch chunks into reusable pinned
buffers ahead of time, copies to the device are non-blocking, results come back through
non-blocking copies into pinned buffers, and a :class:`~featcache.streams.ChunkWriter`
compresses and stores them while the next batch runs. A chunk's done-marker is written only after
its tokens and pooled values are stored.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.encoders import REGISTRY, GridEncoder, LayerRunner, check_layers, get_spec, parse_layers
from featcache.errors import FeatcacheError
from featcache.progress import progress
from featcache.provenance import library_versions
from featcache.stores import FeatureStore, Workspace
from featcache.stores.features import DEFAULT_LAYOUT, chunk_patches_for, layer_arrays, make_identity
from featcache.stores.zarrio import DEFAULT_TOKEN_CODEC
from featcache.streams import ChunkWriter, Prefetcher
from featcache.weights import load_encoder, resolve_weights

FP16_MAX = 65504.0


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


@dataclass
class Group:
    """Whole chunks of one sample computed as one batch: patches [p0, p1)."""

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


def all_encoders() -> list[str]:
    return [n for n, s in REGISTRY.items() if not s.test_only]


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class ExtractionConfig:
    """What decides a feature store's contents: over the same dataset, the same config makes the same store.

    Everything here ends up in the store's identity (featcache/stores/features.py ``make_identity``).
    Where the store lives (the workspace, or ``output``) and how it is computed
    (:class:`ExtractionRuntime`) are not part of it: a resumed or sharded run may change those.
    """

    encoder: str
    weights: str | None = None  # file, folder or random[:SEED]; None: $FEATCACHE_WEIGHTS or the Hugging Face cache
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on a CPU) | bf16 | fp32
    codec: str = DEFAULT_TOKEN_CODEC
    layout: str = DEFAULT_LAYOUT
    chunk_patches: int | None = None  # patches per stored chunk; None: about 8 MB chunks
    # intermediate layers also stored (tokens_<N>), counted from 1 as featcache/encoders.py says; () none
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.precision not in PRECISIONS:
            raise FeatcacheError(f"--precision {self.precision!r}: use auto, bf16 or fp32.")
        if self.chunk_patches is not None and self.chunk_patches < 1:
            raise FeatcacheError(f"--chunk-patches {self.chunk_patches}: must be at least 1.")

    def compute_precision(self, dev: torch.device) -> str:
        return ("bf16" if dev.type == "cuda" else "fp32") if self.precision == "auto" else self.precision


@dataclass(frozen=True)
class ExtractionRuntime:
    """How a store is computed, never what it holds: a resumed run may change any of these."""

    device: str = "auto"
    batch_size: int = 64  # patches per forward pass (rounded to whole chunks)
    compile: bool = False  # torch.compile the encoder
    shard: str | None = None  # K/N; None: torchrun's RANK/WORLD_SIZE, else the whole store
    readers: int = 4  # patch-decoding threads
    writers: int | None = None  # compressing threads; None: up to 8
    overwrite: bool = False  # replace a store of another identity
    show_progress: bool = True
    model: torch.nn.Module | None = None  # a prebuilt network (benchmarks); its weights are whatever it holds

    def __post_init__(self):
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size {self.batch_size}: must be at least 1.")
        if self.readers < 1:
            raise FeatcacheError(f"readers {self.readers}: must be at least 1.")
        if self.writers is not None and self.writers < 1:
            raise FeatcacheError(f"writers {self.writers}: must be at least 1.")


def extraction_configs(encoder: str, **fields) -> list[ExtractionConfig]:
    """``--encoder``'s value as configs: one encoder, or ``all`` (every encoder that is not a test encoder)."""
    return [ExtractionConfig(name, **fields) for name in (all_encoders() if encoder == "all" else [encoder])]


def extract_each(
    dataset: str,
    configs: list[ExtractionConfig],
    *,
    workspace: str | os.PathLike | None = None,
    output: str | None = None,
    storage_options: dict | None = None,
    on_result=None,
    **runtime,
) -> list[ExtractResult]:
    """Several stores one after the other; ``on_result(result)`` hears each as it is finished.

    Every encoder's weights, and the rendering each reads (its pixels per bin), are found before any
    work, so that a missing checkpoint or a dataset without ``image_16px`` does not stop the command half-way.
    """
    if output and len(configs) > 1:
        raise FeatcacheError(
            f"--output names one store, but {len(configs)} encoders were asked for; extract one --encoder "
            "at a time with --output, or leave it out (each encoder then gets its store in the workspace)."
        )
    ExtractionRuntime(**runtime)  # a bad runtime choice is refused before weights are looked for
    for config in configs:
        spec = get_spec(config.encoder)
        check_layers(spec, config.layers)  # on the meta device: an impossible --layers is refused before any work
        resolve_weights(spec, config.weights)
    ds = Workspace.resolve(workspace).dataset(dataset)
    if ds.exists():  # (a missing dataset is refused by extract itself)
        for spec in {s.px_per_bin: s for s in map(get_spec, (c.encoder for c in configs))}.values():
            ds.image_name(spec.px_per_bin, reader=f"{spec.name} ({spec.px_per_bin} px per bin, {spec.input_px} px)")
    results = []
    for config in configs:
        results.append(
            extract(dataset, config, workspace=workspace, output=output, storage_options=storage_options, **runtime)
        )
        if on_result:
            on_result(results[-1])
    return results


def extract(
    dataset: str,
    config: ExtractionConfig,
    *,
    workspace: str | os.PathLike | None = None,
    output: str | None = None,
    storage_options: dict | None = None,
    **runtime,
) -> ExtractResult:
    """Extract one encoder's token grids for every sample of a prepared dataset.

    The store goes to the workspace (``features/<dataset>/<encoder>[-random].zarr``) or to ``output``
    (a path or fsspec URL, opened with ``storage_options``); ``runtime`` holds the fields of
    :class:`ExtractionRuntime` (device, batch_size, compile, shard, readers, writers, overwrite,
    show_progress, model).
    """
    t_start = time.perf_counter()
    rt = ExtractionRuntime(**runtime)
    spec = get_spec(config.encoder)
    ws = Workspace.resolve(workspace)
    ds = _dataset_with_patches(ws, dataset, spec)
    source = resolve_weights(spec, config.weights)
    shard_k, shard_n = parse_shard(rt.shard)
    dev = resolve_device(rt.device)
    precision = config.compute_precision(dev)
    if output:
        ws.check_output(output)
    store = (
        FeatureStore(output, storage_options)
        if output
        else ws.feature_store(dataset, spec.name, source.is_random, source.seed or 0)
    )
    model = rt.model
    if model is None:
        model, prov = load_encoder(spec, source, dev)
    else:
        prov = {"weights": source.identity(), "found_via": "caller"}
    layers = check_layers(spec, config.layers, model)
    identity = make_identity(
        spec=spec.describe(),
        weights=source.identity(),
        dataset=ds.meta,
        px_per_bin=spec.px_per_bin,
        codec=config.codec,
        layout=config.layout,
        prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)) if spec.kind == "vit" else 0,
        chunk=config.chunk_patches or chunk_patches_for(spec.grid, spec.dim),
        compute={"precision": precision, "autocast": precision == "bf16"},
        layers=layers,
    )
    provenance = {
        **prov,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "batch_size": rt.batch_size,
        "compile": rt.compile,
        "libraries": library_versions(),
    }
    root = store.open_or_create(identity, provenance, {s: ds.origins(s) for s in ds.samples}, rt.overwrite)

    groups = plan_groups(identity["samples"], identity["chunk_patches"], rt.batch_size)[shard_k::shard_n]
    done = {s: store.done_chunks(s) for s in identity["samples"]}
    todo = [g for g in groups if not set(g.chunks) <= done[g.sample]]
    n_todo = sum(g.p1 - g.p0 for g in todo)
    seconds = 0.0
    if todo:
        runner = LayerRunner(GridEncoder(spec, model), config.layers).to(dev).eval()
        job = _Extraction(
            torch.compile(runner) if rt.compile else runner,
            dev,
            precision,
            rt.batch_size,
            ds,
            store,
            root,
            rt.readers,
            rt.writers or min(8, os.cpu_count() or 1),
            spec.px_per_bin,
        )
        with progress(disable=not rt.show_progress) as bar:
            task = bar.add_task(store.name, total=n_todo, rate="")
            seconds = job.run(todo, lambda k, rate: bar.update(task, advance=k, rate=f"{rate:.1f} tiles/s"))
    return ExtractResult(
        encoder=store.name,
        store=str(store),
        patches_done=n_todo,
        patches_total=sum(identity["samples"].values()),
        seconds=time.perf_counter() - t_start,
        complete=store.status().complete,
        shard=(shard_k, shard_n),
        skipped=sum(g.p1 - g.p0 for g in groups) - n_todo,
        tiles_per_s=n_todo / seconds if seconds else 0.0,
    )


def _dataset_with_patches(ws: Workspace, dataset: str, spec):
    """The dataset, refused when it lacks the rendering the encoder reads (its px per bin: ``image`` at 14,
    ``image_16px`` at 16; the message names the ``prepare`` command that adds it) or any of its chunks."""
    ds = ws.open_dataset(dataset)
    name = ds.image_name(spec.px_per_bin, reader=f"{spec.name} ({spec.px_per_bin} px per bin, {spec.input_px} px)")
    empty = [s for s in ds.samples if ds.n_patches(s) == 0]
    if empty:
        raise FeatcacheError(
            f"dataset {dataset!r} has no patches for sample(s) {', '.join(empty)}; prepare it again "
            "with a lower --min-tissue."
        )
    for s in ds.samples:
        ds.check_chunks(s, (name,))
    return ds


def _layer_shapes(identity: dict) -> list[tuple[str, tuple[int, int, int]]]:
    """(array name, (h, w, channels)) of each intermediate layer the store holds, ascending."""
    out = [(name, (*v["grid"], v["dim"])) for name, v in layer_arrays(identity).items()]
    return sorted(out, key=lambda item: int(item[0].rsplit("_", 1)[1]))


class BufferPool:
    """A fixed set of reusable host buffers (pinned on CUDA).

    Pinning memory is slow (page-locking hundreds of MB per batch cost more than the batch's
    compute in early measurements), so each buffer is pinned once and handed around. A buffer goes
    back to the pool with the CUDA event after which it is free again.
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool, stop: threading.Event):
        self.free: queue.Queue = queue.Queue()
        self.stop = stop
        for _ in range(count):
            self.free.put((torch.empty(shape, dtype=dtype, pin_memory=pin), None))

    def take(self) -> torch.Tensor:
        while True:
            if self.stop.is_set():
                raise RuntimeError("stopped")
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


@dataclass
class _Batch:
    """One group's results on their way to the writer: pinned host buffers and the copy's event."""

    group: Group
    tokens: torch.Tensor
    pooled: torch.Tensor
    flags: torch.Tensor  # (non-finite count, beyond-float16 count)
    event: object
    layers: tuple = ()  # pinned buffers of the intermediate layers' grids, in the order of _layer_shapes


class _Extraction:
    """Reads, computes and writes the groups of one extraction: read → compute → store."""

    def __init__(self, enc, dev, precision, batch_size, dataset, store, root, readers, writers, px_per_bin=14):
        self.enc, self.dev, self.precision, self.batch_size = enc, dev, precision, batch_size
        self.px_per_bin = px_per_bin  # the rendering the encoder reads (docs/design.md §2)
        self.cuda = dev.type == "cuda"
        self.channel_first = store.identity["layout"][1] == "channel"
        self.dataset, self.store, self.root = dataset, store, root
        self.readers, self.writers = readers, writers
        self.stop = threading.Event()
        self.images: dict = {}
        self.outputs: dict = {}  # sample -> (tokens, pooled, *layer arrays), opened once
        self.layer_names = [name for name, _ in _layer_shapes(store.identity)]
        self.layer_shapes = dict(_layer_shapes(store.identity))
        self.in_pool: BufferPool | None = None
        self.out_pools: dict[str, BufferPool] = {}  # made once the first batch's output shapes are known

    def run(self, todo: list[Group], on_progress) -> float:
        """Every group through the pipeline; returns the seconds spent."""
        self.images = {g.sample: self.dataset.image_array(g.sample, self.px_per_bin) for g in todo}
        # every chunk written is real data: no per-chunk "all fill value?" pass (a runtime setting that the
        # opened array does not inherit from create_array; on float16 it cost a third of a core)
        self.outputs = {
            s: tuple(
                self.root[s][name].with_config({"write_empty_chunks": True})
                for name in ("tokens", "pooled", *self.layer_names)
            )
            for s in self.images
        }
        most = max(g.p1 - g.p0 for g in todo)
        self.in_pool = BufferPool(
            self.readers + 2, (most, *self.images[todo[0].sample].shape[1:]), torch.uint8, self.cuda, self.stop
        )
        t0, written, lock = time.perf_counter(), [0], threading.Lock()

        def store(batch: _Batch) -> None:
            self.write(batch)
            with lock:
                written[0] += batch.group.p1 - batch.group.p0
                on_progress(batch.group.p1 - batch.group.p0, written[0] / max(time.perf_counter() - t0, 1e-9))

        batches = iter(Prefetcher(self.read, todo, workers=self.readers, depth=self.readers, name="featcache-reader"))
        try:
            with ChunkWriter(store, threads=self.writers, depth=self.writers + 1) as writer:
                for g, host_in in zip(todo, batches):
                    writer.put(self.compute(g, host_in, most))
        finally:
            self.stop.set()  # readers waiting for a buffer give up
            batches.close()
        return time.perf_counter() - t0

    def read(self, g: Group) -> torch.Tensor:
        buf = self.in_pool.take()
        try:
            block = np.ascontiguousarray(self.images[g.sample][g.p0 : g.p1])
        except Exception as exc:  # noqa: BLE001 - zarr reports checksum and decompression failures as plain errors
            self.in_pool.give(buf)
            name = self.dataset.image_name(self.px_per_bin)
            raise self.dataset.read_error(g.sample, name, np.arange(g.p0, g.p1), exc) from None
        buf[: g.p1 - g.p0].copy_(torch.from_numpy(block))
        return buf

    def compute(self, g: Group, host_in: torch.Tensor, most: int) -> _Batch:
        n = g.p1 - g.p0
        x = host_in[:n].to(self.dev, non_blocking=True)
        self.in_pool.give(host_in, _event(self.cuda))  # reusable once the copy has finished
        outs: list[list[torch.Tensor]] = []  # per output: tokens, pooled, then each layer's grid
        with (
            torch.inference_mode(),
            torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            for i in range(0, n, self.batch_size):  # one forward pass gives the final grid and every layer's
                got = self.enc(x[i : i + self.batch_size])
                outs = outs or [[] for _ in got]
                for part, t in zip(outs, got):
                    part.append(t.float())
        tok, pol, *grids = (torch.cat(part) for part in outs)
        for name, grid in zip(self.layer_names, grids):
            if tuple(grid.shape[1:]) != tuple(self.layer_shapes[name]):
                raise RuntimeError(
                    f"{name}: the encoder gave grids of {tuple(grid.shape[1:])}, the store's identity says "
                    f"{tuple(self.layer_shapes[name])}"
                )
        grids_all = (tok, *grids)
        flags = torch.stack(
            [
                sum((~torch.isfinite(t)).sum() for t in (*grids_all, pol)),
                sum((t.abs() > FP16_MAX).sum() for t in grids_all),
            ]
        )
        if self.channel_first:  # transpose on the device, so the writers read contiguous memory
            grids_all = tuple(t.permute(0, 3, 1, 2) for t in grids_all)
        grids_all = tuple(t.half() for t in grids_all)
        names = ("tokens", *self.layer_names)
        if not self.out_pools:
            for name, t, dtype in (
                *((nm, t, torch.float16) for nm, t in zip(names, grids_all)),
                ("pooled", pol, torch.float32),
            ):
                self.out_pools[name] = BufferPool(self.writers + 2, (most, *t.shape[1:]), dtype, self.cuda, self.stop)
        bufs = [self.out_pools[name].take() for name in names]
        for buf, t in zip(bufs, grids_all):
            buf[:n].copy_(t, non_blocking=self.cuda)
        pool_buf = self.out_pools["pooled"].take()
        pool_buf[:n].copy_(pol, non_blocking=self.cuda)
        return _Batch(g, bufs[0], pool_buf, flags.to("cpu", non_blocking=self.cuda), _event(self.cuda), tuple(bufs[1:]))

    def write(self, b: _Batch) -> None:
        g, n = b.group, b.group.p1 - b.group.p0
        try:
            if b.event is not None:
                b.event.synchronize()
            nonfinite, overflow = (int(v) for v in b.flags.tolist())
            if nonfinite or overflow:
                raise FeatcacheError(
                    f"sample {g.sample}, patches {g.p0}-{g.p1 - 1}: the encoder produced {nonfinite} non-finite values "
                    f"and {overflow} beyond float16's range (±65504); nothing was stored for them. Check the weights, "
                    "or run with --precision fp32."
                )
            tok_arr, pool_arr, *layer_arrs = self.outputs[g.sample]
            for arr, buf in ((tok_arr, b.tokens), *zip(layer_arrs, b.layers)):
                tok_np, k = buf[:n].numpy(), arr.chunks[0]
                for c in g.chunks:  # chunk by chunk: zarr then encodes our buffer without copying it first
                    a, e = c * k, min((c + 1) * k, arr.shape[0])
                    arr[a:e] = tok_np[a - g.p0 : e - g.p0]
            pool_arr[g.p0 : g.p1] = b.pooled[:n].numpy()
        finally:
            self.out_pools["tokens"].give(b.tokens)
            self.out_pools["pooled"].give(b.pooled)
            for name, buf in zip(self.layer_names, b.layers):
                self.out_pools[name].give(buf)
        for c in g.chunks:
            self.store.mark_done(g.sample, c)  # only now does the chunk count as done


def _event(cuda: bool):
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event
