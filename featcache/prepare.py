"""``featcache prepare``: Visium HD samples -> bin-aligned patches and per-bin targets (DESIGN §2, §3).

Reads each sample (featcache/visium.py), chooses the gene panel, finds the patch origins on the
8 µm grid, gathers each patch's 32 × 32 targets and renders its 448 px image, and writes the
dataset through the store layer (featcache/stores/dataset.py holds the format).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, gather_windows, patch_origins
from featcache.progress import progress
from featcache.provenance import library_versions
from featcache.slide import Slide, render_patch
from featcache.stores import Workspace, check_name
from featcache.stores.dataset import DATASET_FORMAT, IMAGE_CHUNK, TARGET_CHUNK, DatasetBuilder
from featcache.streams import Prefetcher
from featcache.visium import VisiumHDSample, open_sample


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
        raise FeatcacheError(
            f"gene list {path}: names matching several features: {'; '.join(ambiguous)}. Use the feature id instead."
        )
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
    """Prepare (or confirm up to date) dataset ``dataset`` from Space Ranger outputs ``{sample: folder}``."""
    t_start = time.perf_counter()
    images = images or {}
    check_name(dataset, "dataset")
    _check_options(samples, images, stride, min_tissue, workers)
    ws = Workspace.resolve(workspace)
    target = ws.dataset(dataset)

    opened = [open_sample(n, p, images.get(n)) for n, p in samples.items()]
    for s in opened:
        _ = s.matrix  # read and check now, before anything is written
    gene_ids, gene_names = select_genes(genes, opened)
    params = {"genes": genes, "stride": stride, "min_tissue": min_tissue, "geometry": GEOMETRY.to_json()}
    files = {s.name: {k: file_fingerprint(p) for k, p in _sample_files(s).items()} for s in opened}
    fingerprint = (
        "sha256:"
        + hashlib.sha256(
            json.dumps({"params": params, "files": files, "gene_ids": list(gene_ids)}, sort_keys=True).encode()
        ).hexdigest()
    )

    if target.path.exists():
        old = target.meta if target.exists() else None
        if old is not None and old.get("fingerprint") == fingerprint:
            n = {k: v["n_patches"] for k, v in old["samples"].items()}
            return PrepareResult(dataset, target.path, True, n, len(gene_ids), time.perf_counter() - t_start)
        if not overwrite:
            what = "different inputs" if old is not None else "no dataset.json (an unknown or damaged folder)"
            raise FeatcacheError(
                f"dataset {dataset!r} already exists at {target.path} with {what}. Pass --overwrite "
                "to replace it, or choose another --dataset name."
            )

    store_attrs = {
        "dataset": dataset,
        "fingerprint": fingerprint,
        "geometry": GEOMETRY.to_json(),
        "featcache_version": __version__,
    }
    with target.builder(store_attrs) as builder, progress(disable=not show_progress) as bar:
        report = {
            s.name: _write_sample(s, stride, min_tissue, gene_ids, gene_names, builder, bar, workers) for s in opened
        }
        builder.commit(
            {
                "format": DATASET_FORMAT,
                "dataset": dataset,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "featcache_version": __version__,
                "fingerprint": fingerprint,
                "geometry": {**GEOMETRY.to_json(), "stride_bins": stride, "min_tissue": min_tissue},
                "genes": {"spec": genes, "ids": list(map(str, gene_ids)), "names": list(map(str, gene_names))},
                "samples": {
                    s.name: {
                        **report[s.name],
                        "source": str(s.bin_dir),
                        "image": str(s.image_path),
                        "files": files[s.name],
                    }
                    for s in opened
                },
                "library_versions": library_versions(),
            }
        )
    return PrepareResult(
        dataset,
        target.path,
        False,
        {k: v["n_patches"] for k, v in report.items()},
        len(gene_ids),
        time.perf_counter() - t_start,
    )


def _check_options(samples: dict, images: dict, stride: int, min_tissue: float, workers: int | None) -> None:
    if not samples:
        raise FeatcacheError("no samples given: pass --sample NAME=DIR once per sample.")
    for name in samples:
        check_name(name, "sample")
    stray = sorted(set(images) - set(samples))
    if stray:
        raise FeatcacheError(f"--image given for {', '.join(stray)}, which is not a --sample name.")
    if not 1 <= stride <= 4 * GEOMETRY.bins:
        raise FeatcacheError(f"--stride {stride}: must be between 1 and {4 * GEOMETRY.bins} bins.")
    if not 0.0 <= min_tissue <= 1.0:
        raise FeatcacheError(f"--min-tissue {min_tissue}: must be a fraction between 0 and 1.")
    if workers is not None and workers < 1:
        raise FeatcacheError(f"--workers {workers}: must be at least 1.")


def _write_sample(s: VisiumHDSample, stride, min_tissue, gene_ids, gene_names, builder: DatasetBuilder, bar, workers):
    in_tissue, column = s.grid_lookup()
    origins = patch_origins(in_tissue, stride, min_tissue)
    arrays = builder.add_sample(
        s.name,
        origins,
        gene_ids,
        _unique_labels(gene_names, gene_ids),
        {
            "sample": s.name,
            "microns_per_pixel": s.microns_per_pixel,
            "bin_affine": s.affine.to_json(),
            "grid_shape": list(s.grid_shape),
            "image": str(s.image_path),
            "image_shape": list(s.image_shape),
        },
    )
    _write_targets(s, origins, in_tissue, column, gene_ids, arrays)
    _render_images(s, origins, arrays.image, bar, workers)
    return {
        "n_patches": int(len(origins)),
        "grid": list(s.grid_shape),
        "in_tissue_bins": int(in_tissue.sum()),
        "microns_per_pixel": s.microns_per_pixel,
        "bin_affine": s.affine.to_json(),
        "image_shape": list(s.image_shape),
    }


def _write_targets(s: VisiumHDSample, origins, in_tissue, column, gene_ids, arrays) -> None:
    """counts, library_size and mask of every patch, chunk by chunk."""
    m = s.matrix
    panel = np.asarray(m.counts[_index_of(m.feature_ids, gene_ids), :].T.todense(), dtype=np.int32)  # bins × genes
    library = m.library_size.astype(np.int32)
    for start in range(0, len(origins), TARGET_CHUNK):
        part = origins[start : start + TARGET_CHUNK]
        idx = gather_windows(column, part)  # (k, b, b) matrix column of each bin, -1 where none
        present = idx >= 0
        safe = np.where(present, idx, 0)
        stop = start + len(part)
        arrays.counts[start:stop] = np.where(present[..., None], panel[safe], 0).transpose(0, 3, 1, 2)
        arrays.library_size[start:stop] = np.where(present, library[safe], 0)
        arrays.mask[start:stop] = gather_windows(in_tissue, part) & present


def _render_images(s: VisiumHDSample, origins, image, bar, workers) -> None:
    """Render every patch (in worker threads, two chunks ahead) and store them chunk by chunk."""
    n = len(origins)
    task = bar.add_task(f"{s.name}: rendering patches", total=n, rate="")
    t0 = time.perf_counter()
    with Slide(s.image_path) as slide:
        render = lambda rc: render_patch(slide, s.affine.matrix, int(rc[0]), int(rc[1]))  # noqa: E731
        rendered = iter(
            Prefetcher(
                render,
                origins,
                workers=workers or min(4, os.cpu_count() or 1),
                depth=2 * IMAGE_CHUNK,
                name="featcache-render",
            )
        )
        try:
            for k in range(0, n, IMAGE_CHUNK):
                block = np.stack([next(rendered) for _ in range(min(IMAGE_CHUNK, n - k))])
                image[k : k + len(block)] = block
                done = k + len(block)
                bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} patches/s")
        finally:
            rendered.close()
