"""The ``featcache`` command line (stage 1: data preparation and feature caching)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from featcache.cli_common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    FeaturesRootOpt,
    OverwriteOpt,
    SeedOpt,
    WeightsOpt,
    WorkspaceOpt,
    err,
    make_app,
    out,
    split_list,
    user_errors,
)
from featcache.errors import FeatcacheError

app = make_app("featcache: cut bin-aligned H&E patches from Visium HD outputs and cache encoder token grids.")


@app.command()
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the samples into.")],
    samples: Annotated[
        str, typer.Option(help="Comma-separated patients (one sample each unless --sections).")
    ] = "P1,P2,P5",
    seed: SeedOpt = 0,
    rows: Annotated[int, typer.Option(help="8 µm bins along array_row per sample.")] = 128,
    cols: Annotated[int, typer.Option(help="8 µm bins along array_col per sample.")] = 160,
    genes: Annotated[int, typer.Option(help="Genes in the panel, at least 61 (above 2000 drawn sparsely).")] = 250,
    sections: Annotated[
        int, typer.Option(help="Sections per patient (samples <patient>-s1, -s2, ...; writes manifest.csv).")
    ] = 1,
    perspective: Annotated[
        float, typer.Option(help="Projective registration: the bin pitch changes by ± this fraction across the grid.")
    ] = 0.0,
    image: Annotated[
        str, typer.Option(help="Microscope image container: btf, ome.tif, tif (striped), jpg, png.")
    ] = "btf",
    compression: Annotated[str, typer.Option(help="TIFF compression: zlib, jpeg, lzw, jpeg2000, none.")] = "zlib",
    antibody_features: Annotated[int, typer.Option(help="Antibody Capture features added to each matrix.")] = 0,
    missing_genes: Annotated[
        Optional[list[str]], typer.Option(help="SAMPLE=N: that sample's matrix lacks the last N genes.")
    ] = None,
    mpp: Annotated[bool, typer.Option("--mpp/--no-mpp", help="Write microns_per_pixel into the scale factors.")] = True,
    spaceranger: Annotated[
        str, typer.Option(help="Space Ranger version to imitate (4.x adds segmented_outputs/).")
    ] = "3.1.2",
):
    """Write a synthetic Visium HD dataset in Space Ranger's on-disk layout, with the quirks real deposits have."""
    from featcache.synth import SynthConfig, plan_samples, synthesize

    plan = plan_samples(split_list(samples), sections, missing_genes)
    cfg = SynthConfig(
        rows=rows,
        cols=cols,
        n_genes=genes,
        seed=seed,
        perspective=perspective,
        image=image,
        compression=compression,
        antibody_features=antibody_features,
        write_mpp=mpp,
        spaceranger=spaceranger,
    )
    with err.status("synthesizing ...") as status:
        reports = synthesize(
            out_dir,
            plan.names,
            cfg,
            on_sample=lambda r: status.update(f"wrote {r['sample']}"),
            per_sample=plan.per_sample,
            patients=plan.patients,
        )
    table = Table(title=f"synthetic Visium HD dataset in {out_dir}")
    for col in ("sample", "patient", "in-tissue bins", "median UMIs/bin", "image (px)", "grid rotation"):
        table.add_column(col)
    for r in reports:
        table.add_row(
            r["sample"],
            r["patient"],
            str(r["in_tissue_bins"]),
            f"{r['median_umis']:.0f}",
            "×".join(map(str, r["image_shape"])),
            f"{r['rotation_deg']:+.2f}°" + (" flipped" if r["flip_rows"] else ""),
        )
    out.print(table)
    if plan.patients:
        out.print(
            f"prepare it with: featcache prepare --dataset NAME --manifest {out_dir / 'manifest.csv'}", soft_wrap=True
        )


@app.command()
@user_errors
def prepare(
    dataset: Annotated[str, typer.Option(help="Name of the dataset to create in the workspace.")],
    sample: Annotated[
        Optional[list[str]],
        typer.Option(
            help="NAME=DIR: a Space Ranger output (folder with outs/, outs/ or square_008um/). Repeat per sample."
        ),
    ] = None,
    image: Annotated[
        Optional[list[str]],
        typer.Option(
            help="NAME=FILE: the microscope image when not found next to outs/ (TIFF/BigTIFF/OME-TIFF/SVS, JPEG, PNG)."
        ),
    ] = None,
    patient: Annotated[
        Optional[list[str]],
        typer.Option(help="SAMPLE=PATIENT: the patient of a sample (default: the sample itself). A fold is a patient."),
    ] = None,
    manifest: Annotated[
        Optional[Path],
        typer.Option(
            help="CSV with columns sample,patient,path[,image], instead of (or beside) --sample/--patient/--image."
        ),
    ] = None,
    genes: Annotated[
        str, typer.Option(help="Gene panel: top-mean:N, or a file with one gene name or id per line.")
    ] = "top-mean:50",
    stride: Annotated[int, typer.Option(help="Step between patch origins, in 8 µm bins.")] = 32,
    min_tissue: Annotated[
        float, typer.Option(help="Keep a patch when at least this fraction of its bins is in tissue.")
    ] = 0.5,
    workers: Annotated[Optional[int], typer.Option(help="Rendering threads (default: up to 4).")] = None,
    px_per_bin: Annotated[
        str,
        typer.Option(
            "--px-per-bin",
            help="Renderings of each patch, in pixels per 8 µm bin: 14 (448 px, patch-14 ViTs, DenseNet) is always "
            "made; 14,16 also renders 512 px patches (image_16px) for patch-16 encoders. On an up-to-date dataset "
            "only a missing rendering is added.",
        ),
    ] = "14",
    overwrite: OverwriteOpt = False,
    workspace: WorkspaceOpt = None,
):
    """Cut bin-aligned 448 px patches (and 512 px ones with --px-per-bin 14,16) and per-bin targets into Zarr
    stores."""
    from featcache.prepare import inputs_from_options, prepare_dataset

    inputs = inputs_from_options(sample, image, patient, manifest)
    res = prepare_dataset(
        dataset,
        inputs.samples,
        inputs.images,
        genes=genes,
        stride=stride,
        min_tissue=min_tissue,
        workspace=workspace,
        overwrite=overwrite,
        workers=workers,
        patients=inputs.patients,
        px_per_bin=px_per_bin,
    )
    if res.up_to_date:
        out.print(f"dataset {dataset!r} is up to date at {res.path}; nothing to do.")
        return
    if res.added:
        out.print(
            f"dataset {dataset!r}: added the {', '.join(map(str, res.added))} px per bin rendering(s) in "
            f"{res.seconds:.1f} s (targets, other renderings and fingerprint unchanged); it holds "
            f"{', '.join(map(str, res.renderings))} px per bin."
        )
        return
    total = sum(res.patches.values())
    out.print(
        f"prepared dataset {dataset!r}: {total} patches ("
        + ", ".join(f"{k} {v}" for k, v in res.patches.items())
        + f"), {res.genes} genes, in {res.seconds:.1f} s"
    )
    from featcache.stores import Dataset

    d = Dataset(res.path)
    out.print(f"  {d.patches_path}\n  {d.targets_path}\n  {d.meta_path}")
    for sample, path in res.qc.items():
        out.print(f"QC picture of {sample} (slide, in-tissue bins, patch outlines): {path}", soft_wrap=True)
    for note in res.notes:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True, highlight=False)


@app.command()
@user_errors
def datasets(workspace: WorkspaceOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """List the prepared datasets in the workspace."""
    from featcache.stores import Workspace

    ws = Workspace.resolve(workspace)
    rows = [d.summary() for d in ws.datasets()]
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        out.print(f"no prepared datasets in {ws.root}")
        return
    table = Table(title=f"datasets in {ws.root}")
    for col in ("dataset", "patches per sample", "genes", "px per bin", "path"):
        table.add_column(col)
    for r in rows:
        samples = ", ".join(f"{k} {v}" for k, v in r["samples"].items())
        table.add_row(r["dataset"], samples, str(r["genes"]), ", ".join(map(str, r["px_per_bin"])), r["path"])
    out.print(table)


@app.command()
@user_errors
def encoders(as_json: Annotated[bool, typer.Option("--json")] = False):
    """List the registered encoders (built-in and plugins): patch, pixels per bin, grid, widths, parameters, licence,
    hub repository, whether the weights are on this machine, and where each entry comes from."""
    from featcache.weights import encoder_overview

    rows = encoder_overview()
    if as_json:
        out.print_json(data=rows)
        return
    listing = out if out.is_terminal else Console(width=200)  # piped: wide enough for every column unfolded
    listing.print(encoder_table(rows))
    out.print(
        "weights: --weights FILE|DIR, $FEATCACHE_WEIGHTS/<encoder>/, or the Hugging Face cache; "
        "--weights random[:SEED] for random-init features.",
        soft_wrap=True,
    )


def encoder_table(rows: list[dict]) -> Table:
    """``featcache encoders``' table of :func:`featcache.weights.encoder_overview`'s rows."""
    table = Table(title="encoders")
    cols = ("encoder", "patch", "px/bin", "grid", "token", "pooled", "params", "licence", "hub", "weights", "source")
    for col in cols:
        table.add_column(col, no_wrap=col not in ("licence", "hub", "weights", "source"), overflow="fold")
    for r in rows:
        table.add_row(
            r["encoder"] + (" (test)" if r["test_only"] else ""),
            str(r["patch_size"]) if r["patch_size"] else f"stride {r['stride']}",
            str(r["px_per_bin"]),
            r["grid"],
            str(r["dim"]),
            str(r["pooled_dim"]) + (f" ({r['pooled']})" if r["pooled"] != "cls" else ""),
            f"{r['params_m']:g} M",
            r["licence"] or "—",
            r["hf_repo"] or "—",
            r["weights"],
            r["source"],
        )
    return table


@app.command()
@user_errors
def extract(
    encoder: Annotated[
        str, typer.Option(help="Encoder name (see `featcache encoders`), or 'all' (every non-test encoder).")
    ],
    dataset: DatasetOpt = "demo",
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32.")] = "auto",
    shard: Annotated[
        Optional[str], typer.Option(help="K/N: do shard K of N (default: from torchrun's RANK/WORLD_SIZE).")
    ] = None,
    output: Annotated[
        Optional[str], typer.Option(help="Store location (path or fsspec URL) instead of the workspace's.")
    ] = None,
    chunk_patches: Annotated[
        Optional[int], typer.Option(help="Patches per stored chunk (default: ~8 MB chunks).")
    ] = None,
    layers: Annotated[
        Optional[str],
        typer.Option(
            help="Also store the grids after these blocks (ViT) or stage outputs (CNN), counted from 1, e.g. 16,24: "
            "arrays tokens_16, tokens_24 (an out-of-range number is refused with the encoder's layers listed)."
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    workspace: WorkspaceOpt = None,
    features_root: FeaturesRootOpt = None,
):
    """Run an encoder once over a dataset's patches and cache its token grids (and, with --layers, intermediate ones)."""
    from featcache.encoders import parse_layers
    from featcache.extract import extract_each, extraction_configs
    from featcache.stores import Workspace

    extract_each(
        dataset,
        extraction_configs(
            encoder, weights=weights, precision=precision, chunk_patches=chunk_patches, layers=parse_layers(layers)
        ),
        workspace=Workspace.resolve(workspace, features_root),
        output=output,
        on_result=_report_extraction,
        batch_size=batch_size,
        device=device,
        compile=compile,
        shard=shard,
        overwrite=overwrite,
    )


def _report_extraction(res) -> None:
    sharded = res.shard[1] > 1
    state = "complete" if res.complete else "incomplete (other shards still to run)" if sharded else "incomplete"
    shard_txt = f" shard {res.shard[0]}/{res.shard[1]}" if sharded else ""
    rate = f" at {res.tiles_per_s:.1f} tiles/s" if res.patches_done else ""
    out.print(
        f"{res.encoder}{shard_txt}: extracted {res.patches_done} patches{rate}"
        f"{f', {res.skipped} already done' if res.skipped else ''}; store {state}: {res.store}",
        soft_wrap=True,
    )


@app.command("ls")
@user_errors
def ls_(
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset.")] = None,
    workspace: WorkspaceOpt = None,
    features_root: FeaturesRootOpt = None,
):
    """List cached feature stores: encoder, weights, completeness, size on disk."""
    from featcache.stores import Workspace

    ws = Workspace.resolve(workspace, features_root)
    stores = [st.status() for st in ws.feature_stores(dataset)]
    if not stores:
        out.print(f"no feature stores in {ws.features_dir()}; make one with `featcache extract --encoder NAME`.")
        return
    table = Table(title=f"feature stores in {ws.features_dir()}")
    for col in ("dataset", "store", "weights", "patches", "grid × dim", "done", "size"):
        table.add_column(col)
    for st in stores:
        i = st.identity
        done = sum(d for d, _ in st.samples.values())
        tot = sum(t for _, t in st.samples.values())
        table.add_row(
            i["dataset"],
            st.location.rstrip("/").rsplit("/", 1)[-1],
            i["weights"][:20],
            str(st.patches),
            f"{i['grid'][0]}×{i['grid'][1]}×{i['dim']}",
            "complete" if st.complete else f"{done}/{tot} chunks",
            format_bytes(st.size_bytes),
        )
    out.print(table)


@app.command()
@user_errors
def info(store: Annotated[str, typer.Argument(help="Feature store path or URL.")]):
    """Show a feature store's identity, provenance, completeness and size."""
    from featcache.stores import FeatureStore

    st = FeatureStore(store).status()
    out.print_json(
        data={
            "store": st.location,
            "complete": st.complete,
            "size": format_bytes(st.size_bytes),
            "chunks_done": {s: f"{d}/{t}" for s, (d, t) in st.samples.items()},
            "identity": st.identity,
            "provenance": st.provenance,
        }
    )


@app.command()
@user_errors
def verify(
    store: Annotated[Optional[str], typer.Argument(help="A feature store (path or URL) or a dataset folder.")] = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="Verify this dataset of the workspace and all its feature stores.")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            help="Drop the done-markers of bad feature chunks, so that rerunning extract recomputes exactly those."
        ),
    ] = False,
    workspace: WorkspaceOpt = None,
    features_root: FeaturesRootOpt = None,
):
    """Read back every chunk (checksums, shapes, finiteness); name missing or corrupted chunks (exit 1 if any)."""
    from featcache.stores import Dataset, FeatureStore, Workspace
    from featcache.stores.location import is_url

    if (store is None) == (dataset is None):
        raise FeatcacheError("give a STORE (a feature store or dataset folder) or --dataset NAME, not both or neither.")
    if dataset is not None:
        ws = Workspace.resolve(workspace, features_root)
        ok = _verify_dataset(ws.open_dataset(dataset))
        ok = all([_verify_store(st, repair) for st in ws.feature_stores(dataset)]) and ok
    elif not is_url(store) and Dataset(Path(store)).exists():
        ok = _verify_dataset(Dataset(Path(store)))
    else:
        ok = _verify_store(FeatureStore(store), repair)
    if not ok:
        raise typer.Exit(1)


def _verify_dataset(ds) -> bool:
    problems = ds.verify()
    for p in problems:
        out.print(f"[red]BAD[/] {p}", highlight=False)
    if problems:
        out.print(
            f"{ds.path}: {len(problems)} problem(s); the dataset cannot be repaired in place: prepare it again "
            "with the same inputs and --overwrite.",
            highlight=False,
        )
        return False
    out.print(f"[green]OK[/] {ds.path}: every chunk read back", highlight=False)
    return True


def _verify_store(st, repair: bool) -> bool:
    rep = st.verify(repair=repair)
    for p in rep.problems:
        out.print(f"[red]BAD[/] {p}", highlight=False)
    for p in rep.not_extracted:
        out.print(f"[yellow]NOT EXTRACTED[/] {p}", highlight=False)
    if rep.ok:
        out.print(f"[green]OK[/] {rep.location}: {rep.checked} chunks verified", highlight=False)
        return True
    if rep.repaired:
        out.print(
            f"{rep.location}: dropped the markers of {rep.repaired} bad chunk(s); rerun `{st.make_hint}` with "
            "the same options to recompute exactly those.",
            highlight=False,
        )
    else:
        out.print(
            f"{rep.location}: {len(rep.problems)} corrupted or missing, {len(rep.not_extracted)} not extracted; "
            + (f"run `featcache verify --repair {rep.location}`, then " if rep.problems else "")
            + f"rerun `{st.make_hint}` with the same options to redo them.",
            highlight=False,
        )
    return False


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
