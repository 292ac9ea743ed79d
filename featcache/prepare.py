"""``featcache prepare``: Visium HD samples -> bin-aligned patches and per-bin targets (docs/design.md §2, §3, §6).

Reads each sample (featcache/visium.py), chooses the gene panel among the Gene Expression
features every sample has, finds the patch origins on the 8 µm grid, gathers each patch's
32 × 32 targets and renders its 448 px image through the sample's bin map (and, with
``--px-per-bin 14,16``, its 512 px image for patch-16 encoders through the same map), and writes the
dataset through the store layer (featcache/stores/dataset.py holds the format). Samples are grouped
into patients (``--patient`` or ``--manifest``): a fold of the evaluation is a patient.

Asking an up-to-date dataset for a rendering it lacks (the same inputs, another ``--px-per-bin``)
adds that rendering alone, staged (:class:`~featcache.stores.dataset.RenderingAdder`): the renderings
are not inputs of the targets, so the dataset's fingerprint, its targets and its other arrays stay as
they are, and every feature store made from it stays valid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache import spaceranger as sr
from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, gather_windows, geometry_for, parse_renderings
from featcache.progress import progress
from featcache.provenance import library_versions
from featcache.qc import OUTLINE, png_bytes, qc_picture
from featcache.slide import Slide, render_patch
from featcache.stores import Workspace, check_name
from featcache.stores.dataset import (
    DATASET_FORMAT,
    IMAGE_CHUNK,
    TARGET_CHUNK,
    Dataset,
    DatasetBuilder,
    RenderingAdder,
    rendering_record,
)
from featcache.streams import Prefetcher
from featcache.visium import GENE_EXPRESSION, VisiumHDSample, open_sample


# --------------------------------------------------------------------------- parsing inputs
def parse_pairs(values: list[str] | None, option: str, what: str = "sample name") -> dict[str, str]:
    """``["P1=DIR", ...]`` -> ``{"P1": "DIR"}``, refusing malformed and repeated names."""
    out: dict[str, str] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise FeatcacheError(f"{option} {item!r}: expected NAME=VALUE, e.g. {option} P1=...")
        if name in out:
            raise FeatcacheError(
                f"{option}: {what} {name!r} is given twice ({out[name]!r} and {value!r}); give each once."
            )
        out[name] = value
    return out


@dataclass
class Inputs:
    """What prepare reads: sample → Space Ranger folder, sample → image, sample → patient."""

    samples: dict[str, str]
    images: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)


def read_manifest(path: str | Path) -> Inputs:
    """A CSV with columns ``sample,patient,path[,image]``; relative paths are taken from the manifest's folder."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"cannot read manifest {path} ({exc}).") from None
    if not rows or not {"sample", "patient", "path"} <= set(rows[0]):
        raise FeatcacheError(
            f"manifest {path} needs a header with the columns sample,patient,path (image optional), "
            "and one row per sample."
        )
    out = Inputs({}, {}, {})
    for line, row in enumerate(rows, start=2):
        sample, patient, folder = (str(row.get(k) or "").strip() for k in ("sample", "patient", "path"))
        if not sample or not patient or not folder:
            raise FeatcacheError(f"manifest {path}, line {line}: sample, patient and path are all required.")
        if sample in out.samples:
            raise FeatcacheError(f"manifest {path}, line {line}: sample {sample!r} appears twice; list each once.")
        resolve = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        out.samples[sample] = resolve(folder)
        out.patients[sample] = patient
        if (row.get("image") or "").strip():
            out.images[sample] = resolve(row["image"].strip())
    return out


def merge_inputs(samples: dict, images: dict, patients: dict, manifest: str | None) -> Inputs:
    """--sample/--image/--patient options and a --manifest, as one checked set of inputs."""
    inputs = read_manifest(manifest) if manifest else Inputs({}, {}, {})
    for kind, given in (("samples", samples), ("images", images), ("patients", patients)):
        mine = getattr(inputs, kind)
        for k, v in given.items():
            if k in mine and mine[k] != v:
                raise FeatcacheError(
                    f"sample {k!r} has two {kind[:-1]}s ({mine[k]!r} in the manifest, {v!r} on the "
                    "command line); give one."
                )
            mine[k] = v
    return inputs


def inputs_from_options(
    samples: list[str] | None, images: list[str] | None, patients: list[str] | None, manifest: str | Path | None
) -> Inputs:
    """``featcache prepare``'s ``--sample/--image/--patient NAME=VALUE`` options and ``--manifest`` as one set."""
    return merge_inputs(
        parse_pairs(samples, "--sample"),
        parse_pairs(images, "--image"),
        parse_pairs(patients, "--patient", "sample"),
        str(manifest) if manifest else None,
    )


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
    spatial = s.bin_dir / sr.SPATIAL
    pos = spatial / sr.POSITIONS_PARQUET
    return {
        "positions": pos if pos.is_file() else spatial / sr.POSITIONS_CSV,
        "scalefactors": spatial / sr.SCALEFACTORS,
        "matrix": s.matrix_path,
        "image": s.image_path,
    }


# --------------------------------------------------------------------------- gene panel
@dataclass
class Panel:
    """The gene panel: Gene Expression features (by id) every sample has, chosen by a rule."""

    ids: np.ndarray
    names: np.ndarray
    spec: str
    not_in_every_sample: dict[str, list[str]]  # feature id -> samples that lack it (never in the panel)
    shared_ids: np.ndarray  # every Gene Expression feature all samples have ...
    shared_totals: np.ndarray  # ... and each sample's total count of it (samples × features)

    def describe(self) -> dict:
        rule = (
            f"the {len(self.ids)} Gene Expression features with the highest mean raw count over every bin of "
            "every sample (the test patients included), among those every sample has"
            if self.spec.startswith("top-mean:")
            else f"the gene list {self.spec}"
        )
        return {
            "spec": self.spec,
            "rule": rule,
            "ids": list(map(str, self.ids)),
            "names": list(map(str, self.names)),
            "not_in_every_sample": self.not_in_every_sample,
        }


def _gene_expression_ids(s: VisiumHDSample) -> dict[str, int]:
    ids = s.matrix.feature_ids
    if len(set(ids)) != len(ids):
        raise FeatcacheError(f"sample {s.name}: {s.matrix.path.name} lists a feature id twice; the file is damaged.")
    return {fid: i for i, fid in enumerate(ids) if s.matrix.feature_types[i] == GENE_EXPRESSION}


def select_genes(spec: str, samples: list[VisiumHDSample], totals: dict[str, np.ndarray]) -> Panel:
    """Resolve ``top-mean:N`` or a gene-list file among the Gene Expression features shared by all samples.

    ``totals`` holds each sample's total count per feature (one pass over its matrix).
    """
    ge = [_gene_expression_ids(s) for s in samples]
    first = samples[0].matrix
    shared = [fid for fid in ge[0] if all(fid in g for g in ge[1:])]
    if not shared:
        raise FeatcacheError("the samples share no Gene Expression feature; were they run with the same reference?")
    everywhere = set(shared)
    lacking = {
        fid: [s.name for s, g in zip(samples, ge) if fid not in g] for g in ge for fid in g if fid not in everywhere
    }
    ids = np.array(shared, dtype=object)
    names = np.array([first.feature_names[ge[0][fid]] for fid in shared], dtype=object)
    per_sample = np.stack([totals[s.name][[g[fid] for fid in shared]] for s, g in zip(samples, ge)])
    if spec.startswith("top-mean:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise FeatcacheError(f"--genes {spec!r}: expected top-mean:N with an integer N, e.g. top-mean:50") from None
        if not 1 <= n <= len(ids):
            raise FeatcacheError(
                f"--genes {spec}: N must be between 1 and {len(ids)} (the shared Gene Expression features)."
            )
        mean = per_sample.sum(axis=0) / max(sum(s.matrix.n_bins for s in samples), 1)
        pick = np.argsort(-mean, kind="stable")[:n]
    else:
        pick = _genes_from_file(Path(spec), ids, names, samples, lacking)
    return Panel(ids[pick], names[pick], spec, lacking, ids, per_sample)


def _genes_from_file(path: Path, ids, names, samples, lacking) -> np.ndarray:
    if not path.is_file():
        raise FeatcacheError(f"--genes {str(path)!r}: not top-mean:N and no such gene-list file.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FeatcacheError(f"gene list {path} is not UTF-8 text; save it as plain text, one gene per line.") from None
    wanted = [w for w in (ln.split("#", 1)[0].strip() for ln in lines) if w]
    if not wanted:
        raise FeatcacheError(f"gene list {path} is empty; put one gene name or feature id per line.")
    by_id = {fid: i for i, fid in enumerate(ids)}
    by_name: dict[str, list[int]] = {}
    for i, nm in enumerate(names):
        by_name.setdefault(nm, []).append(i)
    other = {
        fid: t
        for s in samples
        for fid, nm, t in zip(s.matrix.feature_ids, s.matrix.feature_names, s.matrix.feature_types)
        if t != GENE_EXPRESSION
    }
    other.update(
        {
            nm: t
            for s in samples
            for nm, t in zip(s.matrix.feature_names, s.matrix.feature_types)
            if t != GENE_EXPRESSION
        }
    )
    picked, problems = [], []
    for w in wanted:
        if w in by_id:
            picked.append(by_id[w])
        elif len(by_name.get(w, [])) == 1:
            picked.append(by_name[w][0])
        elif w in by_name:
            problems.append(f"{w} names several features ({', '.join(ids[i] for i in by_name[w])}): use the feature id")
        elif w in lacking:
            problems.append(f"{w} is missing from sample(s) {', '.join(lacking[w])}")
        elif w in other:
            problems.append(f"{w} is a {other[w]} feature (only Gene Expression features are targets)")
        else:
            problems.append(f"{w} is not in the matrix")
    if problems:
        raise FeatcacheError(
            f"gene list {path}: "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
            + ". Fix the list (names or feature ids, one per line)."
        )
    if len(set(picked)) != len(picked):
        raise FeatcacheError(f"gene list {path} names the same gene twice.")
    return np.array(picked)


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
    notes: list[str] = field(default_factory=list)  # what a user should know (conversions, genes left out)
    qc: dict[str, Path] = field(default_factory=dict)  # sample -> its QC picture (slide, bins, patch outlines)
    renderings: list[int] = field(default_factory=lambda: [GEOMETRY.px_per_bin])  # px per bin the dataset holds
    added: list[int] = field(default_factory=list)  # renderings added to an existing dataset by this call


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
    patients: dict[str, str] | None = None,
    px_per_bin: str | int | tuple | list = (GEOMETRY.px_per_bin,),
) -> PrepareResult:
    """Prepare (or confirm up to date) dataset ``dataset`` from Space Ranger outputs ``{sample: folder}``.

    ``patients`` maps samples to patients (default: each sample is its own patient); ``px_per_bin`` lists the
    renderings of the patches (``"14,16"``: also ``image_16px`` for patch-16 encoders; 14 is always made). A
    dataset that is up to date but lacks a rendering asked for gets that rendering added, nothing else.
    """
    t_start = time.perf_counter()
    images, given = images or {}, patients or {}
    check_name(dataset, "dataset")
    _check_options(samples, images, given, stride, min_tissue, workers)
    renderings = parse_renderings(px_per_bin)
    patients = {s: given.get(s, s) for s in samples}
    ws = Workspace.resolve(workspace)
    target = ws.dataset(dataset)
    opened = [open_sample(n, p, images.get(n), px_per_bin=max(renderings)) for n, p in samples.items()]
    files = {s.name: {k: file_fingerprint(p) for k, p in _sample_files(s).items()} for s in opened}
    _refuse_duplicates(opened, files)
    params = {
        "genes": genes,
        "stride": stride,
        "min_tissue": min_tissue,
        "geometry": GEOMETRY.to_json(),
        "patients": patients,
    }
    key = (
        "sha256:" + hashlib.sha256(json.dumps({"params": params, "files": files}, sort_keys=True).encode()).hexdigest()
    )
    if target.path.exists():
        old = target.meta if target.exists() else None
        if old is not None and old.get("inputs_sha256") == key:
            missing = [p for p in renderings if not target.has_rendering(p)]
            if missing:
                _add_renderings(target, opened, missing, stride, min_tissue, workers, show_progress)
            n = {k: v["n_patches"] for k, v in old["samples"].items()}
            qc = {k: target.qc_path(k) for k in n if target.qc_path(k).is_file()}
            took = time.perf_counter() - t_start
            return PrepareResult(
                dataset,
                target.path,
                not missing,
                n,
                len(old["genes"]["ids"]),
                took,
                qc=qc,
                renderings=target.renderings,
                added=missing,
            )
        if not overwrite:
            what = "different inputs" if old is not None else "no dataset.json (an unknown or damaged folder)"
            raise FeatcacheError(
                f"dataset {dataset!r} already exists at {target.path} with {what}. Pass --overwrite "
                "to replace it, or choose another --dataset name."
            )

    cut = {s.name: s.plan_patches(stride, min_tissue) for s in opened}  # refuses samples without patches
    totals, libraries = {}, {}
    for s in opened:
        totals[s.name], libraries[s.name] = s.matrix.scan()
    panel = select_genes(genes, opened, totals)
    fingerprint = (
        "sha256:" + hashlib.sha256(json.dumps({"inputs": key, "gene_ids": list(panel.ids)}).encode()).hexdigest()
    )
    notes = [n for s in opened for n in s.image_info["notes"]]
    if panel.not_in_every_sample:
        notes.append(
            f"{len(panel.not_in_every_sample)} Gene Expression feature(s) are missing from some samples and "
            "were left out of the panel (listed in dataset.json, genes.not_in_every_sample)"
        )
    store_attrs = {
        "dataset": dataset,
        "fingerprint": fingerprint,
        "geometry": GEOMETRY.to_json(),
        "featcache_version": __version__,
    }
    with target.builder(store_attrs, replace=overwrite) as builder, progress(disable=not show_progress) as bar:
        report = {
            s.name: _write_sample(s, cut[s.name], panel, libraries[s.name], builder, bar, workers, renderings)
            for s in opened
        }
        builder.write_gene_totals(
            panel.shared_ids, [s.name for s in opened], panel.shared_totals, [s.matrix.n_bins for s in opened]
        )
        builder.commit(
            {
                "format": DATASET_FORMAT,
                "dataset": dataset,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "featcache_version": __version__,
                "fingerprint": fingerprint,
                "inputs_sha256": key,
                "geometry": {**GEOMETRY.to_json(), "stride_bins": stride, "min_tissue": min_tissue},
                "renderings": [rendering_record(p) for p in renderings],
                "genes": panel.describe(),
                "patients": _by_patient(patients),
                "samples": {
                    s.name: {
                        **report[s.name],
                        "patient": patients[s.name],
                        "source": str(s.bin_dir),
                        "image": str(s.image_path),
                        "files": files[s.name],
                    }
                    for s in opened
                },
                "notes": notes,
                "library_versions": library_versions(),
            }
        )
    return PrepareResult(
        dataset,
        target.path,
        False,
        {k: v["n_patches"] for k, v in report.items()},
        len(panel.ids),
        time.perf_counter() - t_start,
        notes,
        {k: target.qc_path(k) for k in report},
        list(renderings),
    )


def _add_renderings(
    target: Dataset, opened: list[VisiumHDSample], missing: list[int], stride, min_tissue, workers, show_progress
) -> None:
    """Render the ``missing`` renderings of an up-to-date dataset from its slides, at its own origins, and add them
    (staged: :class:`RenderingAdder`); its targets, other arrays and fingerprint are left as they are."""
    with RenderingAdder(target, missing) as adder, progress(disable=not show_progress) as bar:
        for s in opened:
            _, _, origins = s.plan_patches(stride, min_tissue)  # fits each patch's bin map, as when it was made
            stored = target.origins(s.name)
            if not np.array_equal(origins, stored):
                raise FeatcacheError(
                    f"dataset {target.name!r}: sample {s.name}'s patches cut now ({len(origins)}) are not the ones it "
                    f"holds ({len(stored)}); it was made by another featcache version ("
                    f"{target.meta.get('featcache_version', '?')}). Prepare it again with --overwrite."
                )
            _render_images(s, origins, adder.add_sample(s.name, len(origins)), bar, workers)
        adder.commit()


def _by_patient(patients: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for sample, patient in patients.items():
        out.setdefault(patient, []).append(sample)
    return out


def _check_options(samples: dict, images: dict, patients: dict, stride: int, min_tissue: float, workers) -> None:
    if not samples:
        raise FeatcacheError("no samples given: pass --sample NAME=DIR once per sample (or --manifest FILE.csv).")
    for name in samples:
        check_name(name, "sample")
    for name in set(patients.values()):
        check_name(name, "patient")
    for option, given in (("--image", images), ("--patient", patients)):
        stray = sorted(set(given) - set(samples))
        if stray:
            raise FeatcacheError(f"{option} given for {', '.join(stray)}, which is not a --sample name.")
    if not 1 <= stride <= 4 * GEOMETRY.bins:
        raise FeatcacheError(f"--stride {stride}: must be between 1 and {4 * GEOMETRY.bins} bins.")
    if not 0.0 <= min_tissue <= 1.0:
        raise FeatcacheError(f"--min-tissue {min_tissue}: must be a fraction between 0 and 1.")
    if workers is not None and workers < 1:
        raise FeatcacheError(f"--workers {workers}: must be at least 1.")


def _refuse_duplicates(opened: list[VisiumHDSample], files: dict) -> None:
    """One Space Ranger output under two sample names would put a test patient into its own training set."""
    seen: dict[tuple, str] = {}
    for s in opened:
        for key in ((s.bin_dir.resolve(),), ("matrix", files[s.name]["matrix"])):
            if key in seen:
                raise FeatcacheError(
                    f"samples {seen[key]} and {s.name} are the same Space Ranger output "
                    f"({s.bin_dir}); give each sample once."
                )
            seen[key] = s.name


def _write_sample(
    s: VisiumHDSample, cut, panel: Panel, library, builder: DatasetBuilder, bar, workers, renderings
) -> dict:
    in_tissue, column, origins = cut
    arrays = builder.add_sample(
        s.name,
        origins,
        panel.ids,
        _unique_labels(panel.names, panel.ids),
        {
            "sample": s.name,
            "microns_per_pixel": s.microns_per_pixel,
            "registration": s.registration.to_json(),
            "grid_shape": list(s.grid_shape),
            "image": str(s.image_path),
            "image_shape": list(s.image_shape),
        },
        renderings,
    )
    ge = _gene_expression_ids(s)
    counts = s.matrix.gather(np.array([ge[fid] for fid in panel.ids]))  # bins × genes, one pass over the matrix
    _write_targets(origins, in_tissue, column, counts, library.astype(np.int32), arrays)
    del counts
    _render_images(s, origins, arrays.images, bar, workers)
    picture, scale = qc_picture(s.image_path, s.registration, in_tissue, origins, s.name)
    builder.write_qc(s.name, png_bytes(picture))
    return {
        "n_patches": int(len(origins)),
        "qc": {"picture": f"qc/{s.name}.png", "scale": scale, "outline": list(OUTLINE)},
        "in_tissue_bins": int(in_tissue.sum()),
        "bins_in_matrix": int(s.matrix.n_bins),
        **s.describe(),
    }


def _write_targets(origins, in_tissue, column, panel_counts, library, arrays) -> None:
    """counts, library_size and mask of every patch, chunk by chunk."""
    for start in range(0, len(origins), TARGET_CHUNK):
        part = origins[start : start + TARGET_CHUNK]
        idx = gather_windows(column, part)  # (k, b, b) matrix column of each bin, -1 where none
        present = idx >= 0
        safe = np.where(present, idx, 0)
        stop = start + len(part)
        arrays.counts[start:stop] = np.where(present[..., None], panel_counts[safe], 0).transpose(0, 3, 1, 2)
        arrays.library_size[start:stop] = np.where(present, library[safe], 0)
        arrays.mask[start:stop] = gather_windows(in_tissue, part) & present


def _render_images(s: VisiumHDSample, origins, images: dict, bar, workers) -> None:
    """Render every patch at each rendering of ``images`` (px per bin -> its array), in worker threads two chunks
    ahead, each from the full-resolution slide through the patch's own bin map, and store them chunk by chunk."""
    n = len(origins)
    geoms = [geometry_for(p) for p in images]
    task = bar.add_task(f"{s.name}: rendering patches ({', '.join(map(str, images))} px per bin)", total=n, rate="")
    t0 = time.perf_counter()
    with Slide(s.image_path) as slide:
        reg = s.registration

        def render(rc):
            bin_map = reg.map_for(*rc)
            return [render_patch(slide, bin_map, int(rc[0]), int(rc[1]), g) for g in geoms]

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
                block = [next(rendered) for _ in range(min(IMAGE_CHUNK, n - k))]
                for j, image in enumerate(images.values()):
                    image[k : k + len(block)] = np.stack([patch[j] for patch in block])
                done = k + len(block)
                bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} patches/s")
        finally:
            rendered.close()
