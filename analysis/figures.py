"""The comparison figures (DESIGN §7), drawn with matplotlib as PNG and PDF.

Comparison figures read ``results/<dataset>/encoder_loocv_comparison.json`` (the reference
schema, so a hand-made file in that schema can be drawn too); spatial rows read the run folders.
Colours are the Okabe–Ito palette (colour-blind safe); error bars are the population std over
folds.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from analysis.api import open_run, stitch, stitch_image
from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from featcache.stores.files import write_json

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MODE_COLOURS = {"frozen": "#0072B2", "finetune": "#D55E00", "random": "#999999"}
CATEGORIES = {
    "epithelial": {
        "EPCAM",
        "CEACAM5",
        "CEACAM6",
        "KRT8",
        "KRT20",
        "OLFM4",
        "MUC12",
        "PIGR",
        "KRT18",
        "KRT19",
        "LGALS4",
        "PHGR1",
        "ELF3",
        "CDH17",
        "AGR2",
        "TFF3",
    },
    "goblet": {"FCGBP", "MUC2", "ZG16", "CLCA1", "SPINK4", "REG4"},
    "fibroblast": {"COL1A1", "COL1A2", "COL3A1", "LUM", "DCN", "VIM", "SPARC", "MGP", "COL6A3"},
    "muscle": {"DES", "ACTG2", "MYH11", "TAGLN", "CNN1", "MYL9"},
    "immune": {"IGKC", "JCHAIN", "IGHG1", "IGHA1", "MZB1", "IGHM", "CD74", "HLA-DRA", "LYZ", "C1QC", "C1QB", "APOE"},
    "mitochondrial": {"MT-CO3", "MT-ATP6", "MT-CO1", "MT-CO2", "MT-ND4"},
}
DEFAULT_GENES = ("EPCAM", "DES", "CD74", "COL1A1", "MT-CO3", "MUC12")


def category(gene: str) -> str:
    return next((c for c, genes in CATEGORIES.items() if gene in genes), "other")


STYLE = {
    "figure.dpi": 110,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "font.size": 9,
}


@contextmanager
def _style():
    """Our style for the figures drawn inside, without touching the caller's matplotlib settings."""
    with matplotlib.rc_context(STYLE):
        yield


def _figure(width: float, height: float, ncols: int = 1, layout: str | None = None):
    """A Figure and its axes, drawn without pyplot (no backend is chosen or changed)."""
    fig = Figure(figsize=(width, height), layout=layout)
    return fig, fig.subplots(1, ncols)


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    return paths


def _metric(run: dict, key: str) -> tuple[float, float]:
    v = run.get(key) or {}
    return (v.get("mean") if v.get("mean") is not None else np.nan), (v.get("std") or 0.0)


def _cell(by: dict, encoder: str, mode: str, key: str) -> tuple[float, float]:
    """(mean, std) of one encoder × mode, NaN where that run does not exist."""
    return _metric(by[(encoder, mode)], key) if (encoder, mode) in by else (np.nan, 0.0)


def _finish_bars(ax, x, encoders, label: str, title: str) -> None:
    ax.set_xticks(x, encoders, rotation=20, ha="right")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(frameon=False, fontsize=8)


def load_results(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"no results file {path}; make it with `train loocv`.")
    res = json.loads(path.read_text())
    if "results" not in res or not res["results"]:
        raise FeatcacheError(f"{path} has no 'results' section in the reference schema.")
    for name, r in res["results"].items():
        r.setdefault("encoder", name.split("_")[0])
        r.setdefault("mode", "frozen" if r.get("frozen", True) else "finetune")
        if "random" in name and r["mode"] == "frozen":
            r["mode"] = "random"
    return res


def _key_metric(res: dict) -> str:
    """pcc_gene where the file has it (ours), else the reference file's pearson_r."""
    any_run = next(iter(res["results"].values()))
    return "pcc_gene" if (any_run.get("pcc_gene") or {}).get("mean") is not None else "pearson_r"


def comparison_figures(results_path, out: Path, params: dict[str, float] | None = None) -> list[Path]:
    """encoder_comparison, encoder_comparison_grouped, encoder_simple, params_vs_pcc, per_fold_consistency."""
    with _style():
        return _comparison_figures(results_path, out, params)


def _comparison_figures(results_path, out: Path, params: dict[str, float] | None) -> list[Path]:
    res = load_results(results_path)
    runs = res["results"]
    key = _key_metric(res)
    label = "PCC per gene (mean over genes)" if key == "pcc_gene" else "Pearson r (all values)"
    encoders = sorted({r["encoder"] for r in runs.values()})
    by = {(r["encoder"], r["mode"]): r for r in runs.values()}
    written: list[Path] = []

    # 1. encoder_comparison: frozen (or best non-random) bars with fold std, random-init as a floor.
    fig, ax = _figure(1.3 * len(encoders) + 2.5, 3.8)
    x = np.arange(len(encoders))
    main = [by.get((e, "frozen")) or by.get((e, "finetune")) for e in encoders]
    m = [_metric(r, key) if r else (np.nan, 0) for r in main]
    ax.bar(x, [v for v, _ in m], yerr=[s for _, s in m], color=OKABE_ITO[0], capsize=4, label="frozen encoder")
    rnd = [_cell(by, e, "random", key) for e in encoders]
    ax.errorbar(
        x,
        [v for v, _ in rnd],
        yerr=[sd for _, sd in rnd],
        fmt="D",
        color="black",
        ms=6,
        capsize=3,
        zorder=3,
        label="random-init encoder (floor)",
    )
    _finish_bars(ax, x, encoders, label, "Encoder comparison (leave-one-patient-out, mean ± std over folds)")
    written += _save(fig, out, "encoder_comparison")

    # 2. encoder_comparison_grouped: frozen vs fine-tuned (vs random) side by side.
    modes = [md for md in ("random", "frozen", "finetune") if any((e, md) in by for e in encoders)]
    fig, ax = _figure(1.5 * len(encoders) + 2.5, 3.8)
    w = 0.8 / max(len(modes), 1)
    for i, md in enumerate(modes):
        vals = [_cell(by, e, md, key) for e in encoders]
        ax.bar(
            x + (i - (len(modes) - 1) / 2) * w,
            [v for v, _ in vals],
            w,
            yerr=[s for _, s in vals],
            capsize=3,
            color=MODE_COLOURS[md],
            label={"random": "random-init", "frozen": "frozen", "finetune": "fine-tuned"}[md],
        )
    _finish_bars(ax, x, encoders, label, "Frozen vs fine-tuned encoders")
    written += _save(fig, out, "encoder_comparison_grouped")

    # 3. encoder_simple: every run, sorted.
    order = sorted(runs, key=lambda k: -np.nan_to_num(_metric(runs[k], key)[0], nan=-9))
    fig, ax = _figure(5.5, 0.38 * len(order) + 1.2)
    vals = [_metric(runs[k], key) for k in order]
    ax.barh(
        range(len(order)),
        [v for v, _ in vals],
        xerr=[s for _, s in vals],
        capsize=3,
        color=[MODE_COLOURS.get(runs[k]["mode"], OKABE_ITO[0]) for k in order],
    )
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title("All runs")
    written += _save(fig, out, "encoder_simple")

    # 4. params_vs_pcc (log x).
    from featcache.encoders import REGISTRY

    params = params or {n: s.params for n, s in REGISTRY.items()}
    fig, ax = _figure(5, 3.8)
    for md in modes:
        pts = [(params.get(e), _metric(by[(e, md)], key)[0], e) for e in encoders if (e, md) in by and params.get(e)]
        if pts:
            ax.scatter([p for p, _, _ in pts], [v for _, v, _ in pts], color=MODE_COLOURS[md], label=md, s=40, zorder=3)
            for p, v, e in pts:
                ax.annotate(e, (p, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("encoder parameters")
    ax.set_ylabel(label)
    ax.set_title("Model size vs accuracy")
    ax.legend(frameon=False, fontsize=8)
    written += _save(fig, out, "params_vs_pcc")

    # 5. per_fold_consistency: one line per run across the test patients.
    folds = sorted({f for r in runs.values() for f in r.get("fold_results", {})})
    fig, ax = _figure(1.2 * len(folds) + 3.5, 3.8)
    fold_key = "pcc_gene" if key == "pcc_gene" else "pearson_r"
    for i, (name, r) in enumerate(sorted(runs.items())):
        ys = [r.get("fold_results", {}).get(f, {}).get(fold_key, np.nan) for f in folds]
        ax.plot(
            range(len(folds)),
            [np.nan if v is None else v for v in ys],
            marker="o",
            label=name,
            color=OKABE_ITO[i % len(OKABE_ITO)],
            ls="--" if r["mode"] == "random" else "-",
        )
    ax.set_xticks(range(len(folds)), [f.replace("test_", "test ") for f in folds])
    ax.set_ylabel(label)
    ax.set_title("Per-fold consistency")
    ax.legend(frameon=False, fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    written += _save(fig, out, "per_fold_consistency")
    return written


def spatial_figures(
    dataset: str, sample: str, run_dirs: dict[str, Path], genes, out: Path, workspace=None
) -> list[Path]:
    """Rows H&E | truth | one panel per run for each gene, on the stitched test slide; shared colour scale."""
    with _style():
        return _spatial_figures(dataset, sample, run_dirs, genes, out, workspace)


def _spatial_figures(dataset, sample, run_dirs, genes, out: Path, workspace) -> list[Path]:
    runs = {name: open_run(d) for name, d in run_dirs.items()}
    if not runs:
        raise FeatcacheError(f"no finished runs with sample {sample} as the test patient.")
    first = next(iter(runs.values()))
    he = stitch_image(dataset, sample, workspace=workspace)
    written = []
    summary = {}
    for name, ds in runs.items():
        m = ds.attrs.get("metrics", {})
        summary[name] = {k: m.get(k) for k in ("pcc_gene", "pcc_global", "spearman_gene", "ssim_st", "mse")}
    for gene in genes:
        if gene not in first.gene.values:
            continue
        truth = stitch(first, gene, "truth")
        mask = stitch(first, gene, "mask") if "gene" not in first["mask"].dims else None
        inside = truth.values[np.isfinite(truth.values) & (mask.values > 0.5 if mask is not None else True)]
        lo, hi = np.percentile(inside, [1, 99]) if inside.size else (0, 1)
        n = 2 + len(runs)
        fig, axes = _figure(2.6 * n, 2.9, ncols=n, layout="constrained")
        axes[0].imshow(he)
        axes[0].set_title(f"H&E ({sample})")
        im = axes[1].imshow(_masked(truth, mask), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        axes[1].set_title(f"truth: {gene}")
        for ax, (name, ds) in zip(axes[2:], runs.items()):
            pg = ds.attrs.get("metrics", {}).get("per_gene", {}).get(gene, {})
            axes_title = f"{name}\nPCC {_fmt(pg.get('pcc'))}  SSIM {_fmt(pg.get('ssim'))}"
            ax.imshow(
                _masked(stitch(ds, gene, "pred"), mask), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest"
            )
            ax.set_title(axes_title, fontsize=8)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[1:], shrink=0.8, label="z-scored log1p(CP10k)")
        written += _save(fig, out / "spatial", f"{category(gene)}_{gene}_{sample}")
    path = out / f"metrics_summary_{sample}.json"
    write_json(path, {"dataset": dataset, "sample": sample, "runs": summary})
    written.append(path)
    return written


def _masked(values, mask) -> np.ndarray:
    """A stitched map with bins outside the tissue blanked (NaN)."""
    return np.where(mask.values > 0.5, values.values, np.nan) if mask is not None else values.values


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def draw_all(dataset: str, sample: str | None = None, genes=DEFAULT_GENES, workspace=None) -> list[Path]:
    """Every comparison figure, and the spatial rows of test patient ``sample`` [default: the last fold]."""
    ws = Workspace.resolve(workspace)
    results = ws.results(dataset)
    written = comparison_figures(results.comparison_path, results.figures_dir)
    finished = [r for r in ws.runs(dataset) if r.is_finished()]
    folds = sorted({r.fold for r in finished})
    if not folds:
        return written
    sample = sample or folds[-1]
    if sample not in folds:
        raise FeatcacheError(f"--sample {sample}: no finished run tests on it (have: {', '.join(folds)}).")
    run_dirs = {f"{r.path.parents[1].name}/{r.path.parent.name}": r.path for r in finished if r.fold == sample}
    return written + spatial_figures(dataset, sample, run_dirs, genes, results.figures_dir, workspace=ws.root)
