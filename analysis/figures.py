"""The figures (docs/design.md §7), drawn with matplotlib's object API (no pyplot, no backend chosen) as PNG and PDF.

The comparison figures read ``results/<dataset>/encoder_loocv_comparison.json`` alone (a file in
the reference study's schema can be drawn too); the spatial rows draw the runs that file lists,
from their run folders. Colours are the Okabe–Ito palette (colour-blind safe); error bars are the
population std over folds.
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
MODE_LABELS = {"random": "random-init (floor)", "frozen": "frozen", "finetune": "fine-tuned"}
LABELS = {"pcc_gene": "PCC per gene (mean over genes)", "pearson_r": "Pearson r (all values, the reference's)"}


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


def _metric(run: dict | None, key: str) -> tuple[float, float]:
    v = (run or {}).get(key) or {}
    return (v.get("mean") if v.get("mean") is not None else np.nan), (v.get("std") or 0.0)


def _legend_outside(ax) -> None:
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def load_results(path) -> dict:
    """The comparison file, each run tagged with its encoder, mode and whether it follows the default protocol."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"no results file {path}; make it with `train loocv` or `train summarize`.")
    res = json.loads(path.read_text())
    if not res.get("results"):
        raise FeatcacheError(f"{path} has no 'results' section in the reference schema.")
    for name, r in res["results"].items():
        r.setdefault("encoder_name", r.get("encoder", name.split("_")[0]))
        r.setdefault("mode", "random" if "random" in name else "frozen" if r.get("frozen", True) else "finetune")
        r.setdefault("default_protocol", True)
    return res


def _key_metric(res: dict) -> str:
    """pcc_gene where the file has it (ours), else the reference file's pearson_r."""
    has = any(np.isfinite(_metric(r, "pcc_gene")[0]) for r in res["results"].values())
    return "pcc_gene" if has else "pearson_r"


def comparison_figures(results_path, out: Path, params: dict[str, float] | None = None) -> list[Path]:
    """encoder_comparison, encoder_comparison_grouped, encoder_simple, params_vs_pcc, per_fold_consistency,
    pcc_vs_bin_size."""
    with _style():
        res = load_results(results_path)
        key = _key_metric(res)
        runs = res["results"]
        main = {(r["encoder_name"], r["mode"]): r for r in runs.values() if r["default_protocol"]}
        encoders = sorted({e for e, _ in main})
        written = _modes_figure(
            main,
            encoders,
            key,
            out,
            "encoder_comparison",
            "Every mode of every encoder (leave-one-patient-out, mean ± std over folds)",
        )
        written += _modes_figure(
            main,
            encoders,
            "pearson_r",
            out,
            "encoder_comparison_grouped",
            "The same runs in the reference study's metric (pearson_r)",
        )
        written += _all_runs(runs, key, out)
        written += _params(main, encoders, key, out, params)
        written += _per_fold(runs, key, out)
        written += bin_size_figure(runs, out)
        return written


def _modes_figure(main: dict, encoders: list[str], key: str, out: Path, name: str, title: str) -> list[Path]:
    """Frozen and fine-tuned bars per encoder; random-init drawn as a dashed floor across the encoder's group."""
    fig, ax = _figure(1.4 * len(encoders) + 3.5, 3.8)
    x = np.arange(len(encoders))
    bars = [m for m in ("frozen", "finetune") if any((e, m) in main for e in encoders)] or ["frozen"]
    w = 0.8 / len(bars)
    for i, mode in enumerate(bars):
        vals = [_metric(main.get((e, mode)), key) for e in encoders]
        ax.bar(
            x + (i - (len(bars) - 1) / 2) * w,
            [v for v, _ in vals],
            w,
            yerr=[s for _, s in vals],
            capsize=3,
            color=MODE_COLOURS[mode],
            label=MODE_LABELS[mode],
        )
    floor = [_metric(main.get((e, "random")), key)[0] for e in encoders]
    for xi, v in zip(x, floor):
        if np.isfinite(v):
            ax.hlines(
                v,
                xi - 0.45,
                xi + 0.45,
                colors="black",
                linestyles="--",
                lw=1.4,
                zorder=4,
                label=MODE_LABELS["random"] if xi == x[np.isfinite(floor)][0] else None,
            )
    ax.set_xticks(x, encoders, rotation=20, ha="right")
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_title(title)
    ax.axhline(0, color="black", lw=0.6)
    _legend_outside(ax)
    return _save(fig, out, name)


def _all_runs(runs: dict, key: str, out: Path) -> list[Path]:
    order = sorted(runs, key=lambda k: -np.nan_to_num(_metric(runs[k], key)[0], nan=-9))
    fig, ax = _figure(6.0, 0.38 * len(order) + 1.3)
    vals = [_metric(runs[k], key) for k in order]
    ax.barh(
        range(len(order)),
        [v for v, _ in vals],
        xerr=[s for _, s in vals],
        capsize=3,
        color=[MODE_COLOURS.get(runs[k]["mode"], OKABE_ITO[0]) for k in order],
    )
    ceiling = [_metric(runs[k], "noise_ceiling_pcc_gene")[0] for k in order]
    if key == "pcc_gene" and np.isfinite(ceiling).any():
        ax.axvline(np.nanmean(ceiling), color="#D55E00", ls=":", lw=1.2, label="noise ceiling (synthetic data)")
        _legend_outside(ax)
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel(LABELS.get(key, key))
    ax.set_title("All runs, variants included")
    return _save(fig, out, "encoder_simple")


def _params(main: dict, encoders: list[str], key: str, out: Path, params: dict | None) -> list[Path]:
    from featcache.encoders import REGISTRY

    params = params or {n: s.params for n, s in REGISTRY.items()}
    fig, ax = _figure(5.5, 3.8)
    for mode in ("frozen", "finetune", "random"):
        pts = [(params.get(e), _metric(main.get((e, mode)), key)[0], e) for e in encoders if (e, mode) in main]
        pts = [p for p in pts if p[0]]
        if pts:
            ax.scatter(
                [p for p, _, _ in pts],
                [v for _, v, _ in pts],
                color=MODE_COLOURS[mode],
                label=MODE_LABELS[mode],
                s=40,
                zorder=3,
            )
            for p, v, e in pts:
                ax.annotate(e, (p, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("encoder parameters")
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_title("Model size vs accuracy")
    _legend_outside(ax)
    return _save(fig, out, "params_vs_pcc")


def _per_fold(runs: dict, key: str, out: Path) -> list[Path]:
    folds = sorted({f for r in runs.values() for f in r.get("fold_results", {})})
    fig, ax = _figure(1.2 * len(folds) + 3.5, 3.8)
    fold_key = "pcc_gene" if key == "pcc_gene" else "pearson_r"
    for i, (name, r) in enumerate(sorted(runs.items())):
        ys = [r.get("fold_results", {}).get(f, {}).get(fold_key) for f in folds]
        ax.plot(
            range(len(folds)),
            [np.nan if v is None else v for v in ys],
            marker="o",
            label=name,
            color=OKABE_ITO[i % len(OKABE_ITO)],
            ls="--" if r["mode"] == "random" else "-",
        )
    ax.set_xticks(range(len(folds)), [f.replace("test_", "test patient ") for f in folds])
    ax.set_ylabel(LABELS.get(fold_key, fold_key))
    ax.set_title("Per-fold consistency")
    _legend_outside(ax)
    return _save(fig, out, "per_fold_consistency")


# PCC at each scale: the 8 µm bin, 2 × 2 and 4 × 4 blocks, and the whole patch (HEST-Benchmark's unit)
SCALES = (("pcc_gene", 8), ("pcc_gene_16um", 16), ("pcc_gene_32um", 32), ("pcc_gene_patch", 256))


def bin_size_figure(runs: dict, out: Path) -> list[Path]:
    """pcc_gene against bin size (8, 16, 32 µm and the 256 µm patch) per run, mean ± std over folds."""
    fig, ax = _figure(6.5, 3.8)
    drawn = 0
    for i, (name, r) in enumerate(sorted(runs.items())):
        vals = [_metric(r, k) for k, _ in SCALES]
        if not np.isfinite([v for v, _ in vals[1:]]).any():
            continue  # a run scored before the coarse scales existed
        ax.errorbar(
            [um for _, um in SCALES],
            [v for v, _ in vals],
            yerr=[sd for _, sd in vals],
            marker="o",
            capsize=3,
            label=name,
            color=OKABE_ITO[i % len(OKABE_ITO)],
            ls="--" if r.get("mode") == "random" else "-",
        )
        drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xticks([um for _, um in SCALES], ["8 µm", "16 µm", "32 µm", "patch mean\n(HEST)"])
    ax.minorticks_off()
    ax.set_xlabel("bin size (8–32 µm: counts pooled before the transform; patch: mean of its bins' targets)")
    ax.set_ylabel(LABELS["pcc_gene"])
    ax.set_title("PCC against bin size")
    if drawn:
        _legend_outside(ax)
    else:
        ax.text(
            0.5,
            0.5,
            "no run reports 16 / 32 µm scores yet\n(train the runs again)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    return _save(fig, out, "pcc_vs_bin_size")


def spatial_figures(
    dataset: str, sample: str, run_dirs: dict[str, Path], genes, out: Path, workspace=None
) -> list[Path]:
    """Rows H&E | truth | one panel per run for each gene, on the stitched test section; one colour scale."""
    runs, genes, _ = _open_runs(run_dirs, sample, genes)
    he = stitch_image(dataset, sample, workspace=workspace)
    with _style():
        return _spatial_figures(dataset, sample, runs, genes, out, he)


def _open_runs(run_dirs: dict[str, Path], sample: str, genes) -> tuple[dict, list[str], str]:
    """The runs testing on ``sample``, verified, their maps of ``genes`` read (a damaged chunk fails here, before
    anything is drawn); every gene must be in their panel [default: those of DEFAULT_GENES that are, else the
    panel's best by the runs' mean per-gene PCC]. Returns (runs, genes, how the genes were chosen)."""
    runs = {name: open_run(d) for name, d in run_dirs.items()}
    if not runs:
        raise FeatcacheError(f"no finished runs with sample {sample} as a test section.")
    how = "--genes"
    if genes is None:
        panel = [str(g) for g in next(iter(runs.values())).gene.values]
        genes = [g for g in DEFAULT_GENES if g in panel]
        how = "the default genes in the panel"
        if not genes:
            genes, how = _best_genes(runs, panel), "none of the default genes is in the panel"
            how += f"; the panel's {len(genes)} best by the runs' mean per-gene PCC"
    genes = list(genes)
    for name, ds in runs.items():
        panel = {str(g) for g in ds.gene.values}
        unknown = [g for g in genes if g not in panel]
        if unknown:
            raise FeatcacheError(
                f"--genes: {', '.join(unknown)} not in the panel of run {name} "
                f"(e.g. {', '.join(sorted(panel)[:5])}); nothing was drawn."
            )
        source = ds.encoding.get("source", str(run_dirs[name]))
        try:
            runs[name] = ds.sel(gene=genes).load()
        except Exception as exc:  # checksum, decompression or a missing chunk file
            raise FeatcacheError(
                f"cannot read pred of {source} ({type(exc).__name__}: {str(exc)[:100]}); the predictions are "
                "damaged. Train the run again with --overwrite."
            ) from None
    return runs, genes, how


FALLBACK_GENES = 6  # spatial rows drawn when the panel has none of DEFAULT_GENES


def _best_genes(runs: dict, panel: list[str], n: int = FALLBACK_GENES) -> list[str]:
    """The ``n`` genes of the panel with the highest per-gene PCC averaged over the runs (panel order on ties;
    a gene no run scored counts as -1; a name the panel repeats is left out, as it names no single map)."""

    def mean_pcc(gene: str) -> float:
        scores = [ds.attrs.get("metrics", {}).get("per_gene", {}).get(gene, {}).get("pcc") for ds in runs.values()]
        scores = [v for v in scores if isinstance(v, (int, float)) and np.isfinite(v)]
        return float(np.mean(scores)) if scores else -1.0

    unique = [g for g in dict.fromkeys(panel) if panel.count(g) == 1]
    return sorted(unique, key=lambda g: -mean_pcc(g))[:n]


def _spatial_figures(dataset, sample, runs: dict, genes, out: Path, he: np.ndarray) -> list[Path]:
    first = next(iter(runs.values()))
    fold = first.attrs.get("metrics", {}).get("fold", sample)
    space = first.attrs.get("units", "z-scored log1p(CP10k)")
    written, summary = [], {}
    for name, ds in runs.items():
        m = ds.attrs.get("metrics", {})
        summary[name] = {
            k: m.get(k) for k in ("pcc_gene", "pcc_global", "spearman_gene", "spearman_global", "ssim_st", "mse")
        }
    for gene in genes:
        truth = stitch(first, gene, "truth", sample=sample)
        mask = stitch(first, gene, "mask", sample=sample)
        inside = truth.values[np.isfinite(truth.values) & (mask.values > 0.5)]
        lo, hi = np.percentile(inside, [1, 99]) if inside.size else (0, 1)
        n = 2 + len(runs)
        fig, axes = _figure(2.6 * n, 3.1, ncols=n, layout="constrained")
        axes[0].imshow(he)
        axes[0].set_title(f"H&E, section {sample}")
        im = axes[1].imshow(_masked(truth, mask), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        axes[1].set_title(f"measured {gene}")
        for ax, (name, ds) in zip(axes[2:], runs.items()):
            pg = ds.attrs.get("metrics", {}).get("per_gene", {}).get(gene, {})
            ax.imshow(
                _masked(stitch(ds, gene, "pred", sample=sample), mask),
                cmap="viridis",
                vmin=lo,
                vmax=hi,
                interpolation="nearest",
            )
            ax.set_title(f"{name}\n{gene}: PCC {_fmt(pg.get('pcc'))}, SSIM {_fmt(pg.get('ssim'))}", fontsize=8)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[1:], shrink=0.8, label=space)
        fig.suptitle(
            f"{gene} ({category(gene)}), test patient {fold}: per-gene PCC and SSIM over this fold's test bins",
            fontsize=9,
        )
        written += _save(fig, out / "spatial", f"{category(gene)}_{gene}_{sample}")
    path = out / f"metrics_summary_{sample}.json"
    write_json(path, {"dataset": dataset, "sample": sample, "fold": fold, "runs": summary})
    written.append(path)
    return written


def _masked(values, mask) -> np.ndarray:
    """A stitched map with bins outside the tissue blanked (NaN)."""
    return np.where(mask.values > 0.5, values.values, np.nan)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def draw_all(dataset: str, sample: str | None = None, genes=None, workspace=None, on_genes=None) -> list[Path]:
    """Every comparison figure, and the spatial rows of test section ``sample`` [default: the last one].

    ``genes`` [default: those of DEFAULT_GENES in the panel, else the panel's best by PCC] must all be in the
    runs' panel; ``on_genes(genes, how)`` is told which were drawn and why. The comparison
    file, every run folder it lists, the sample and the genes are checked before anything is written.
    """
    from featcache.stores import RunDir

    ws = Workspace.resolve(workspace)
    results = ws.results(dataset)
    runs = load_results(results.comparison_path)["results"]
    by_section: dict[str, dict[str, Path]] = {}
    for name, r in runs.items():
        for f in r.get("fold_results", {}).values():
            if f.get("run_dir"):
                if not (ws.root / f["run_dir"]).is_dir():
                    raise FeatcacheError(
                        f"{results.comparison_path} lists run folder {ws.root / f['run_dir']} (run {name}), which "
                        f"is not on disk (moved or deleted?); nothing was drawn. Run `train summarize --dataset "
                        f"{dataset}` again to list the runs there are."
                    )
                RunDir(ws.root / f["run_dir"]).read_metrics()  # config.json and metrics.json of one run, or refused
                for s in f.get("test_samples") or []:
                    by_section.setdefault(s, {})[name] = ws.root / f["run_dir"]
    if sample is not None and sample not in by_section:
        have = ", ".join(sorted(by_section)) or "none: it lists no run folder of this workspace"
        raise FeatcacheError(f"--sample {sample}: no run of the comparison file tests on it (have: {have}).")
    if not by_section:
        if genes:
            raise FeatcacheError(
                f"--genes: the comparison file {results.comparison_path} lists no run folder of this workspace, "
                "so there is no map to draw them on."
            )
        return comparison_figures(results.comparison_path, results.figures_dir)
    sample = sample or sorted(by_section)[-1]
    opened, genes, how = _open_runs(by_section[sample], sample, genes)
    he = stitch_image(dataset, sample, workspace=ws.root)  # read (a damaged chunk refused) before anything is written
    if on_genes is not None:
        on_genes(genes, how)
    written = comparison_figures(results.comparison_path, results.figures_dir)
    with _style():
        return written + _spatial_figures(dataset, sample, opened, genes, results.figures_dir, he)
