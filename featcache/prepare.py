"""``featcache prepare``: Visium HD samples -> bin-aligned patches and per-bin targets (DESIGN §2, §7).

Writes, under ``<workspace>/datasets/<dataset>/``::

    patches.zarr/<sample>/image    uint8 (patch, y, x, rgb)   448 × 448 × 3 per patch
    patches.zarr/<sample>/origin   int32 (patch, axis)        array (row, col) of the patch's bin (0, 0)
    targets.zarr/<sample>/counts   int32 (patch, gene, row, col)  raw UMI counts of the gene panel
    targets.zarr/<sample>/library_size  int32 (patch, row, col)   all-gene UMIs of the bin
    targets.zarr/<sample>/mask     bool  (patch, row, col)        bin is in tissue (and in the matrix)
    targets.zarr/<sample>/{gene, gene_id, origin}                 coordinates
    dataset.json                   samples, gene panel, geometry, source fingerprints

The dataset is built in a hidden folder beside its final place and moved there only when complete,
so an interrupted run never leaves a half-written dataset that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from featcache import __version__
from featcache.errors import FeatcacheError
from featcache.progress import progress
from featcache.provenance import library_versions, read_json
from featcache.slide import PatchGeometry, Slide, render_patch
from featcache.visium import VisiumHDSample, open_sample
from featcache.workspace import Workspace
from featcache.zarrio import consolidate, create_array, write_origins, write_strings

DATASET_FORMAT = "featcache.dataset/1"
IMAGE_CHUNK = 8  # patches per image chunk (~4.8 MB raw)
TARGET_CHUNK = 32  # patches per target chunk


# --------------------------------------------------------------------------- parsing inputs
def parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """``["P1=DIR", ...]`` -> ``{"P1": "DIR"}``, refusing malformed and duplicate names."""
    out: dict[str, str] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise FeatcacheError(f"{option} {item!r}: expected NAME=PATH, e.g. {option} P1=/data/P1")
        if name in out:
            raise FeatcacheError(f"{option}: sample name {name!r} is given twice; each sample needs its own name.")
        out[name] = value
    return out


def _check_name(name: str, what: str) -> None:
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise FeatcacheError(f"{what} {name!r} is not a valid name: use letters, digits, '-', '_' (no '/', ':').")


# --------------------------------------------------------------------------- fingerprints
def file_fingerprint(path: Path, full_limit: int = 256 << 20) -> str:
    """sha256 of the file; files over ``full_limit`` are hashed by size + 32 spread 1 MiB blocks."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= full_limit:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        for k in range(32):
            fh.seek((size - (1 << 20)) * k // 31)
            h.update(fh.read(1 << 20))
    return "sha256-sampled:" + h.hexdigest()


def _sample_files(s: VisiumHDSample) -> dict[str, Path]:
    spatial = s.bin_dir / "spatial"
    pos = spatial / "tissue_positions.parquet"
    return {
        "positions": pos if pos.is_file() else spatial / "tissue_positions.csv",
        "scalefactors": spatial / "scalefactors_json.json",
        "matrix": s.matrix_path,
        "image": s.image_path,
    }


# --------------------------------------------------------------------------- gene panel
def select_genes(spec: str, samples: list[VisiumHDSample]) -> tuple[np.ndarray, np.ndarray]:
    """Resolve ``top-mean:N`` or a gene-list file to (feature ids, names) shared by all samples."""
    first = samples[0].matrix
    for s in samples[1:]:
        if not np.array_equal(np.sort(s.matrix.feature_ids), np.sort(first.feature_ids)):
            raise FeatcacheError(
                f"samples {samples[0].name} and {s.name} have different feature sets; prepare samples "
                "processed with the same Space Ranger reference together."
            )
    ids, names = first.feature_ids, first.feature_names
    if spec.startswith("top-mean:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise FeatcacheError(f"--genes {spec!r}: expected top-mean:N with an integer N, e.g. top-mean:50") from None
        if not 1 <= n <= len(ids):
            raise FeatcacheError(f"--genes {spec}: N must be between 1 and {len(ids)} (the number of features).")
        total = np.zeros(len(ids))
        n_bins = 0
        for s in samples:
            order = _index_of(s.matrix.feature_ids, ids)
            total += np.asarray(s.matrix.counts.sum(axis=1)).ravel()[order]
            n_bins += s.matrix.counts.shape[1]
        mean = total / max(n_bins, 1)
        pick = np.argsort(-mean, kind="stable")[:n]
        return ids[pick], names[pick]
    path = Path(spec)
    if not path.is_file():
        raise FeatcacheError(f"--genes {spec!r}: not top-mean:N and no such gene-list file.")
    wanted = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    wanted = [w for w in wanted if w]
    if not wanted:
        raise FeatcacheError(f"gene list {path} is empty; put one gene name or feature id per line.")
    by_id = {fid: i for i, fid in enumerate(ids)}
    by_name: dict[str, list[int]] = {}
    for i, nm in enumerate(names):
        by_name.setdefault(nm, []).append(i)
    picked, unknown, ambiguous = [], [], []
    for w in wanted:
        if w in by_id:
            picked.append(by_id[w])
        elif len(by_name.get(w, [])) == 1:
            picked.append(by_name[w][0])
        elif w in by_name:
            ambiguous.append(f"{w} ({', '.join(ids[i] for i in by_name[w])})")
        else:
            unknown.append(w)
    if unknown:
        raise FeatcacheError(
            f"gene list {path}: {len(unknown)} gene(s) not in the matrix: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}. Check the spelling or use feature ids."
        )
    if ambiguous:
        raise FeatcacheError(f"gene list {path}: names matching several features: {'; '.join(ambiguous)}. Use the feature id instead.")
    if len(set(picked)) != len(picked):
        raise FeatcacheError(f"gene list {path} names the same gene twice.")
    picked = np.array(picked)
    return ids[picked], names[picked]


def _index_of(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    pos = {v: i for i, v in enumerate(have)}
    return np.array([pos[v] for v in want], dtype=np.int64)


def _unique_labels(names: np.ndarray, ids: np.ndarray) -> list[str]:
    """Gene names as coordinate labels; a repeated name gets its feature id appended."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n} ({i})" for n, i in zip(names, ids)]


# --------------------------------------------------------------------------- patch index
def patch_origins(in_tissue: np.ndarray, geom: PatchGeometry, stride: int, min_tissue: float) -> np.ndarray:
    """Origins (row, col) stepping ``stride`` bins whose window's in-tissue fraction >= min_tissue."""
    rows, cols = in_tissue.shape
    b = geom.bins
    integral = np.zeros((rows + 1, cols + 1), np.int64)
    integral[1:, 1:] = in_tissue.astype(np.int64).cumsum(0).cumsum(1)
    r0 = np.arange(0, rows - b + 1, stride)
    c0 = np.arange(0, cols - b + 1, stride)
    rr, cc = np.meshgrid(r0, c0, indexing="ij")
    inside = integral[rr + b, cc + b] - integral[rr, cc + b] - integral[rr + b, cc] + integral[rr, cc]
    keep = inside >= min_tissue * b * b - 1e-9
    return np.column_stack([rr[keep], cc[keep]]).astype(np.int32)


def gather_windows(grid: np.ndarray, origins: np.ndarray, bins: int) -> np.ndarray:
    """(n, bins, bins) slices of a per-bin grid at each patch origin (row, col)."""
    return np.stack([grid[r : r + bins, c : c + bins] for r, c in origins])


# --------------------------------------------------------------------------- the job
@dataclass
class PrepareResult:
    dataset: str
    path: Path
    up_to_date: bool
    patches: dict[str, int]
    genes: int
    seconds: float


def prepare_dataset(
    dataset: str,
    samples: dict[str, str],
    images: dict[str, str] | None = None,
    genes: str = "top-mean:50",
    stride: int = 32,
    min_tissue: float = 0.5,
    workspace: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    show_progress: bool = True,
) -> PrepareResult:
    t_start = time.perf_counter()
    images = images or {}
    geom = PatchGeometry()
    _check_name(dataset, "dataset")
    if not samples:
        raise FeatcacheError("no samples given: pass --sample NAME=DIR once per sample.")
    for name in samples:
        _check_name(name, "sample")
    stray = sorted(set(images) - set(samples))
    if stray:
        raise FeatcacheError(f"--image given for {', '.join(stray)}, which is not a --sample name.")
    if not 1 <= stride <= 4 * geom.bins:
        raise FeatcacheError(f"--stride {stride}: must be between 1 and {4 * geom.bins} bins.")
    if not 0.0 <= min_tissue <= 1.0:
        raise FeatcacheError(f"--min-tissue {min_tissue}: must be a fraction between 0 and 1.")

    opened = [open_sample(n, p, images.get(n)) for n, p in samples.items()]
    for s in opened:
        _ = s.matrix  # read and check now, before anything is written
    gene_ids, gene_names = select_genes(genes, opened)

    ws = Workspace.resolve(workspace)
    target = ws.dataset_dir(dataset)
    params = {"genes": genes, "stride": stride, "min_tissue": min_tissue, "geometry": geom.to_json()}
    files = {s.name: {k: file_fingerprint(p) for k, p in _sample_files(s).items()} for s in opened}
    fingerprint = "sha256:" + hashlib.sha256(
        json.dumps({"params": params, "files": files, "gene_ids": list(gene_ids)}, sort_keys=True).encode()
    ).hexdigest()

    meta_path = ws.dataset_json(dataset)
    if target.exists():
        old = read_json(meta_path)
        if old is not None and old.get("fingerprint") == fingerprint:
            n = {k: v["n_patches"] for k, v in old["samples"].items()}
            return PrepareResult(dataset, target, True, n, len(gene_ids), time.perf_counter() - t_start)
        if not overwrite:
            what = "different inputs" if old is not None else "no dataset.json (an unknown or damaged folder)"
            raise FeatcacheError(
                f"dataset {dataset!r} already exists at {target} with {what}. Pass --overwrite to replace it, "
                "or choose another --dataset name."
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{dataset}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        patches_root = zarr.open_group(zarr.storage.LocalStore(partial / "patches.zarr"), mode="w", zarr_format=3)
        targets_root = zarr.open_group(zarr.storage.LocalStore(partial / "targets.zarr"), mode="w", zarr_format=3)
        store_attrs = {"dataset": dataset, "fingerprint": fingerprint, "geometry": geom.to_json(), "featcache_version": __version__}
        patches_root.attrs.update(store_attrs)
        targets_root.attrs.update(store_attrs)
        report = {}
        with progress(disable=not show_progress) as bar:
            for s in opened:
                report[s.name] = _write_sample(s, geom, stride, min_tissue, gene_ids, gene_names,
                                               patches_root, targets_root, bar, workers)
        for store in ("patches.zarr", "targets.zarr"):
            consolidate(partial / store)
        meta = {
            "format": DATASET_FORMAT,
            "dataset": dataset,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "featcache_version": __version__,
            "fingerprint": fingerprint,
            "geometry": {**geom.to_json(), "stride_bins": stride, "min_tissue": min_tissue},
            "genes": {"spec": genes, "ids": list(map(str, gene_ids)), "names": list(map(str, gene_names))},
            "samples": {
                s.name: {**report[s.name], "source": str(s.bin_dir), "image": str(s.image_path), "files": files[s.name]}
                for s in opened
            },
            "library_versions": library_versions(),
        }
        (partial / "dataset.json").write_text(json.dumps(meta, indent=2))
        _swap_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PrepareResult(dataset, target, False, {k: v["n_patches"] for k, v in report.items()},
                         len(gene_ids), time.perf_counter() - t_start)


def _write_sample(s, geom, stride, min_tissue, gene_ids, gene_names, patches_root, targets_root, bar, workers):
    in_tissue, column = s.grid_lookup()
    origins = patch_origins(in_tissue, geom, stride, min_tissue)
    n, b, px = len(origins), geom.bins, geom.patch_px
    m = s.matrix
    rows = _index_of(m.feature_ids, gene_ids)
    panel = np.asarray(m.counts[rows, :].T.todense(), dtype=np.int32)  # bins × genes
    library = m.library_size.astype(np.int32)
    n_genes = len(gene_ids)

    pg = patches_root.create_group(s.name)
    pg.attrs.update({
        "sample": s.name, "microns_per_pixel": s.microns_per_pixel, "bin_affine": s.affine.to_json(),
        "grid_shape": list(s.grid_shape), "image": str(s.image_path), "image_shape": list(s.image_shape),
    })
    image = create_array(pg, "image", shape=(n, px, px, 3), chunks=(IMAGE_CHUNK, px, px, 3), dtype="uint8",
                         dims=("patch", "y", "x", "rgb"), level=3, attributes={"coordinates": "origin"})
    write_origins(pg, origins)

    tg = targets_root.create_group(s.name)
    tg.attrs.update({"sample": s.name, "counts": "raw UMI counts of the gene panel per 8 µm bin"})
    write_strings(tg, "gene", _unique_labels(gene_names, gene_ids), "gene")
    write_strings(tg, "gene_id", gene_ids, "gene")
    write_origins(tg, origins)
    counts = create_array(tg, "counts", shape=(n, n_genes, b, b), chunks=(TARGET_CHUNK, n_genes, b, b),
                          dtype="int32", dims=("patch", "gene", "row", "col"),
                          attributes={"coordinates": "gene_id origin"})
    libsize = create_array(tg, "library_size", shape=(n, b, b), chunks=(TARGET_CHUNK, b, b), dtype="int32",
                           dims=("patch", "row", "col"), attributes={"coordinates": "origin"})
    mask = create_array(tg, "mask", shape=(n, b, b), chunks=(TARGET_CHUNK, b, b), dtype="bool",
                        dims=("patch", "row", "col"), fill_value=False, attributes={"coordinates": "origin"})

    for start in range(0, n, TARGET_CHUNK):
        stop = min(start + TARGET_CHUNK, n)
        idx = gather_windows(column, origins[start:stop], b)  # (k, b, b)
        present = idx >= 0
        safe = np.where(present, idx, 0)
        counts[start:stop] = np.where(present[..., None], panel[safe], 0).transpose(0, 3, 1, 2)
        libsize[start:stop] = np.where(present, library[safe], 0)
        tissue = gather_windows(in_tissue, origins[start:stop], b)
        mask[start:stop] = tissue & present

    task = bar.add_task(f"{s.name}: rendering patches", total=n, rate="")
    t0 = time.perf_counter()
    with Slide(s.image_path) as slide, ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        render = lambda rc: render_patch(slide, s.affine.matrix, int(rc[0]), int(rc[1]), geom)  # noqa: E731
        chunk_starts = range(0, n, IMAGE_CHUNK)
        futures = [[pool.submit(render, origins[i]) for i in range(k, min(k + IMAGE_CHUNK, n))] for k in chunk_starts[:2]]
        for j, k in enumerate(chunk_starts):
            if j + 2 < len(chunk_starts):  # keep two chunks in flight
                nk = chunk_starts[j + 2]
                futures.append([pool.submit(render, origins[i]) for i in range(nk, min(nk + IMAGE_CHUNK, n))])
            block = np.stack([f.result() for f in futures[j]])
            futures[j] = None
            image[k : k + len(block)] = block
            done = k + len(block)
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} patches/s")
    return {
        "n_patches": int(n),
        "grid": list(s.grid_shape),
        "in_tissue_bins": int(in_tissue.sum()),
        "microns_per_pixel": s.microns_per_pixel,
        "bin_affine": s.affine.to_json(),
        "image_shape": list(s.image_shape),
    }


def _swap_into_place(partial: Path, target: Path) -> None:
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(partial, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, target)


def load_dataset_meta(workspace: Workspace, dataset: str) -> dict:
    """dataset.json of a prepared dataset, or one clear error saying how to make it."""
    meta = read_json(workspace.dataset_json(dataset))
    if meta is None:
        known = sorted(p.name for p in (workspace.root / "datasets").glob("*") if (p / "dataset.json").is_file()) \
            if (workspace.root / "datasets").is_dir() else []
        raise FeatcacheError(
            f"no prepared dataset {dataset!r} in workspace {workspace.root}"
            + (f" (it has: {', '.join(known)})" if known else "")
            + ". Make it with `featcache prepare --dataset NAME --sample NAME=DIR ...`."
        )
    return meta
