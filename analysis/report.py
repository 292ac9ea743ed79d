"""``analysis report``: the whole benchmark of a dataset on one page, ``results/<dataset>/report/index.html``.

The page is one file: every figure is inline (PNG as ``data:`` URIs), its style is inline and its one
script (sorting a table by a clicked column) is ours and inline, so it opens offline by
double-clicking and loads nothing from the network. What it shows comes from the comparison file
(read defensively: a file with ``incomplete`` or ``inconsistent`` runs lists them apart), the run
folders it names (training curves, per-section spatial maps), ``paired_comparison.json`` when
``analysis compare`` made one, and the dataset's ``dataset.json`` and QC pictures.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from analysis.curves import curve_data, draw_training_curves, run_folds, seed_entries
from analysis.figures import DEFAULT_GENES, category, comparison_figures, load_results, spatial_figures
from featcache.errors import FeatcacheError
from featcache.provenance import library_versions
from featcache.stores import Workspace
from featcache.stores.files import staged_file

METRICS = (
    "pcc_gene",
    "pearson_r",
    "spearman_rho",
    "ssim_st",
    "mse",
    "pcc_gene_patch",
    "pcc_gene_16um",
    "pcc_gene_32um",
)
COMPARISON_FIGURES = (
    "encoder_comparison",
    "encoder_comparison_grouped",
    "encoder_simple",
    "per_fold_consistency",
    "pcc_vs_bin_size",
)
N_SPATIAL_GENES = 3


def write_report(dataset: str, genes=None, workspace=None) -> Path:
    """Draw what is missing and write ``results/<dataset>/report/index.html``; returns its path."""
    ws = Workspace.resolve(workspace)
    results = ws.results(dataset)
    results.read_comparison(required=True)
    res = load_results(results.comparison_path)
    runs = res["results"]
    figures = results.figures_dir
    if not all((figures / f"{n}.png").is_file() for n in COMPARISON_FIGURES):
        comparison_figures(results.comparison_path, figures)
    folds = {name: run_folds(ws, r) for name, r in runs.items()}
    curves = {name: curve_data(ws, r) for name, r in runs.items()}
    curves = {  # ridge runs: no epochs
        name: c for name, c in curves.items() if any(s["epoch"] for b in c.values() for s in b.values())
    }
    for name, c in curves.items():
        draw_training_curves(name, c, results.training_curves_path(name), loss=runs[name].get("loss"))
    chosen = _genes(runs, genes)
    spatial = _spatial(ws, dataset, runs, folds, chosen, figures)
    ds = ws.open_dataset(dataset) if ws.dataset(dataset).exists() else None
    sections = [
        _header(dataset, res),
        _comparison_section(res),
        _figures_section(figures, results.read_paired()),
        _genes_section(runs, spatial, {name: _map_seed(runs[name], f) for name, f in folds.items() if f}),
        _curves_section(results, curves),
        _qc_section(ds),
        _provenance_section(dataset, res, ds, folds),
    ]
    page = PAGE.format(title=html.escape(f"featcache report: {dataset}"), style=STYLE, script=SCRIPT)
    page = page.replace("<!--BODY-->", "\n".join(sections))
    path = results.report_path
    with staged_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- what to draw
def _genes(runs: dict, genes) -> list[str]:
    """The spatial maps' genes: those asked for, else the default markers in the panel, else the best-predicted."""
    panel = list(next(iter(runs.values())).get("per_gene_pcc", {}))
    if genes:
        missing = [g for g in genes if g not in panel]
        if missing:
            raise FeatcacheError(
                f"--genes: {', '.join(missing)} not in the panel of the runs (e.g. {', '.join(panel[:5])})."
            )
        return list(genes)
    picked = [g for g in DEFAULT_GENES if g in panel][:N_SPATIAL_GENES]
    if not picked:
        mean = {g: np.nanmean([_num(r.get("per_gene_pcc", {}).get(g)) for r in runs.values()]) for g in panel}
        picked = sorted(panel, key=lambda g: -np.nan_to_num(mean[g], nan=-9))[:N_SPATIAL_GENES]
    return picked


def _spatial(ws, dataset, runs, folds, genes, figures: Path) -> dict[str, dict[str, Path]]:
    """section -> gene -> the PNG of its row (H&E | truth | each run), drawn when missing."""
    by_section: dict[str, dict[str, Path]] = {}
    for name, f in folds.items():
        for fold, rd in f.items():
            for s in (runs[name]["fold_results"][f"test_{fold}"].get("test_samples")) or []:
                by_section.setdefault(s, {})[name] = rd.path
    out: dict[str, dict[str, Path]] = {}
    for section, run_dirs in sorted(by_section.items()):
        paths = {g: figures / "spatial" / f"{category(g)}_{g}_{section}.png" for g in genes}
        if not all(p.is_file() for p in paths.values()):
            spatial_figures(dataset, section, run_dirs, genes, figures, workspace=ws.root)
        out[section] = {g: p for g, p in paths.items() if p.is_file()}
    return out


# --------------------------------------------------------------------------- sections
def _header(dataset: str, res: dict) -> str:
    about = res.get("about") or {}
    best = about.get("best_by_pcc_gene")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"<h1>featcache benchmark: dataset <code>{_e(dataset)}</code></h1>"]
    lines.append(
        f"<p class='meta'>{_e(res.get('title', ''))}. Comparison file of {_e(about.get('updated', res.get('date')))}; "
        f"page written {_e(when)}." + (f" Best run by pcc_gene: <b>{_e(best)}</b>." if best else "") + "</p>"
    )
    nav = [("comparison", "Comparison"), ("figures", "Figures"), ("genes", "Per gene"), ("curves", "Training curves")]
    nav += [("qc", "QC at prepare"), ("provenance", "Methodology and provenance")]
    lines.append("<nav>" + " · ".join(f"<a href='#{k}'>{v}</a>" for k, v in nav) + "</nav>")
    return "\n".join(lines)


def _comparison_section(res: dict) -> str:
    runs = res["results"]
    head = ["run", "encoder", "mode", "variant", "seeds", *METRICS, "pcc_gene std over seeds"]
    head += ["training-mean floor (mse)", "noise ceiling"]
    rows = []
    for name, r in runs.items():
        cells = [
            _td(name),
            _td(r.get("encoder_name", r.get("encoder", ""))),
            _td(r.get("mode", "")),
            _td(r.get("run", name)),
            _td(_seeds(r)),
        ]
        for m in METRICS:
            cells.append(_metric_td(name, m, r.get(m)))
        cells.append(_plain_td((r.get("pcc_gene") or {}).get("std_over_seeds")))  # None with one seed: a dash
        cells.append(_plain_td(_floor(r)))
        cells.append(_metric_td(name, "noise_ceiling_pcc_gene", r.get("noise_ceiling_pcc_gene")))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    out = [
        "<section id='comparison'><h2>Comparison</h2>",
        "<p>Every run of the comparison file, leave-one-patient-out: mean ± spread over folds (population std, "
        "as the file records it; n folds in the tooltip); with several seeds, a fold's value is the mean over its seeds "
        "and the spread of the seeds' leave-one-patient-out means is shown beside. pcc_gene is the primary metric (Pearson per gene over "
        "the test bins, mean over genes); pearson_r and spearman_rho are over all values, as the reference study "
        "reported. The floor is the mse of predicting each gene's training mean; the noise ceiling (synthetic "
        "data only) scores the true rates as a prediction. pcc_gene_patch is HEST-Benchmark's metric (per-gene "
        "Pearson across test patches of patch means); pcc_gene_16um and _32um score 2×2 and 4×4-bin blocks. "
        "Click a column to sort.</p>",
        _table("comparison-table", head, rows, numeric_from=5),
    ]
    for key, title in (
        ("incomplete", "Incomplete runs (not in the table: some folds missing)"),
        ("inconsistent", "Inconsistent runs (folds trained with different settings)"),
    ):
        if res.get(key):
            out.append(f"<h3>{title}</h3>" + _listing(res[key], key))
    out.append("</section>")
    return "\n".join(out)


def _figures_section(figures: Path, paired: dict | None) -> str:
    out = ["<section id='figures'><h2>Comparison figures</h2><div class='figs'>"]
    for n in COMPARISON_FIGURES + ("params_vs_pcc",):
        if (figures / f"{n}.png").is_file():
            out.append(_img(figures / f"{n}.png", n.replace("_", " ")))
    out.append("</div>")
    if paired and paired.get("pairs"):
        out.append("<h3>Paired comparisons (<code>analysis compare</code>)</h3>")
        head = ["a", "b", "Δ pcc_gene (b − a)", "95 % interval", "training variance", "genes favouring b"]
        rows = []
        for p in paired["pairs"]:
            ci = p.get("ci95") or [None, None]
            seeds = "included" if p.get("training_variance_included") else "excluded (one seed)"
            rows.append(
                "<tr>"
                + _td(p.get("a"))
                + _td(p.get("b"))
                + _plain_td(p.get("mean_pcc_gene_difference"))
                + _td(f"[{_fmt(ci[0])}, {_fmt(ci[1])}]")
                + _td(seeds)
                + _td(f"{p.get('genes_favouring_b')}/{p.get('n_genes')}")
                + "</tr>"
            )
        out.append(_table("paired-table", head, rows, numeric_from=2))
        out.append(
            "<p>The interval counts test-patient blocks and, with several seeds per run, training variance; genes "
            "favouring b are descriptive (genes share spatial error, so no test over genes is made).</p>"
        )
        for png in sorted(figures.glob("paired*.png")):
            out.append(_img(png, png.stem.replace("_", " ")))
    else:
        out.append("<p>No paired comparison yet: run <code>analysis compare</code> for intervals between runs.</p>")
    out.append("</section>")
    return "\n".join(out)


def _map_seed(run: dict, folds: dict) -> str:
    """The seed(s) whose run folders the maps of ``run`` come from: each fold's ``run_dir`` (its first seed's)."""
    entries = seed_entries(run)
    seeds = {
        e.get("seed") or 0
        for fold in folds
        for e in entries.get(fold, [])
        if e.get("run_dir") == run["fold_results"][f"test_{fold}"].get("run_dir")
    }
    return ", ".join(map(str, sorted(seeds))) or "?"


def _genes_section(runs: dict, spatial: dict, map_seeds: dict | None = None) -> str:
    names = list(runs)
    panel = list(next(iter(runs.values())).get("per_gene_pcc", {}))
    mean = {g: np.nanmean([_num(runs[n].get("per_gene_pcc", {}).get(g)) for n in names]) for g in panel}
    order = sorted(panel, key=lambda g: -np.nan_to_num(mean[g], nan=-9))
    rows = [
        "<tr>"
        + _td(g)
        + _td(category(g))
        + "".join(_plain_td(runs[n].get("per_gene_pcc", {}).get(g)) for n in names)
        + "</tr>"
        for g in order
    ]
    out = [
        "<section id='genes'><h2>Per gene</h2>",
        "<p>Per-gene PCC over the test bins, mean over folds, of every run; sorted by the mean over runs. "
        "Click a column to sort.</p>",
        _table("gene-table", ["gene", "category", *names], rows, numeric_from=2),
    ]
    if spatial and map_seeds:
        by: dict[str, list[str]] = {}
        for name, seed in map_seeds.items():
            by.setdefault(seed, []).append(name)
        which = "; ".join(f"seed {seed}: {', '.join(of)}" for seed, of in by.items())
        if len(by) == 1:
            which = f"seed {next(iter(by))} of every run"
        out.append(
            f"<p class='map-seeds'>Each run's maps show one seed's predictions, its first seed's run folder "
            f"({_e(which)}); the table above is the mean over every seed.</p>"
        )
    for section, by_gene in spatial.items():
        out.append(f"<h3>Test section {_e(section)}: H&amp;E | measured | each run</h3>")
        out += [_img(p, f"{g}, section {section}") for g, p in by_gene.items()]
    out.append("</section>")
    return "\n".join(out)


def _curves_section(results, curves: dict) -> str:
    out = [
        "<section id='curves'><h2>Training curves</h2>",
        "<p>Per run, fold and seed: training loss (the run's own loss) and validation pcc_gene per epoch "
        "(log.jsonl of each seed's run folder; a colour per fold, a line style per seed); the ring marks the epoch "
        "each seed's folder kept. Also written as <code>figures/training_curves_&lt;run&gt;.png</code>.</p>",
    ]
    out.append("<div class='figs'>")
    out += [_img(results.training_curves_path(name), f"training curves of {name}") for name in curves]
    out.append("</div>")
    if not curves:
        out.append("<p>No run folder of the comparison file is in this workspace.</p>")
    out.append("</section>")
    return "\n".join(out)


def _qc_section(ds) -> str:
    out = [
        "<section id='qc'><h2>QC at prepare</h2>",
        "<p>Each sample's slide with its in-tissue bins (green edge) and the kept patches (cyan), drawn through "
        "the registration the patches were rendered with: a wrong µm/px or a flipped grid shows here.</p>",
    ]
    pictures = [(s, ds.qc_path(s)) for s in ds.samples] if ds is not None else []
    pictures = [(s, p) for s, p in pictures if p.is_file()]
    out += ["<div class='figs'>", *(_img(p, f"sample {s}", cls="qc") for s, p in pictures), "</div>"]
    if not pictures:
        out.append("<p>No QC pictures (the dataset was prepared before they were drawn).</p>")
    out.append("</section>")
    return "\n".join(out)


def _provenance_section(dataset: str, res: dict, ds, folds: dict) -> str:
    meth = res.get("methodology") or {}
    panel = meth.get("gene_panel") or {}
    out = ["<section id='provenance'><h2>Methodology and provenance</h2><dl>"]
    if ds is not None:
        out.append(f"<dt>dataset fingerprint</dt><dd><code>{_e(ds.fingerprint)}</code></dd>")
    out.append(f"<dt>gene panel</dt><dd>{_e(panel.get('rule', '—'))} ({_e(panel.get('n_genes', '?'))} genes)</dd>")
    for key in ("cross_validation", "model_selection", "std"):
        if key in meth:
            out.append(f"<dt>{_e(key.replace('_', ' '))}</dt><dd>{_e(meth[key])}</dd>")
    for key in ("metrics", "target_transform", "scored_bins"):
        if isinstance(meth.get(key), dict):
            inner = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in meth[key].items())
            out.append(f"<dt>{_e(key.replace('_', ' '))}</dt><dd><ul>{inner}</ul></dd>")
    out.append("</dl><h3>Feature stores and weights</h3>")
    configs = {name: [rd.read_config() or {} for rd in f.values()] for name, f in folds.items()}
    rows = []
    for name, cfgs in configs.items():
        ids = {json.dumps((c.get("features") or {}), sort_keys=True) for c in cfgs}
        weights = {json.dumps(c.get("encoder_weights"), sort_keys=True) for c in cfgs if c.get("encoder_weights")}
        rows.append("<tr>" + _td(name) + _td("; ".join(sorted(ids | weights)) or "—", code=True) + "</tr>")
    out.append(_table("stores-table", ["run", "features / encoder weights (identity)"], rows, numeric_from=99))
    trained = {
        json.dumps(((c.get("provenance") or {}).get("libraries")), sort_keys=True) for v in configs.values() for c in v
    }
    trained.discard("null")
    out.append("<h3>Library versions</h3>")
    out.append(f"<p>This page: <code>{_e(json.dumps(library_versions()))}</code></p>")
    for t in sorted(trained):
        out.append(f"<p>Training: <code>{_e(t)}</code></p>")
    out.append("<h3>Commands</h3><p>What made these results (from dataset.json and each run's config.json):</p>")
    out.append("<pre>" + _e("\n".join(_commands(dataset, ds, configs))) + "</pre>")
    out.append("</section>")
    return "\n".join(out)


def _commands(dataset: str, ds, configs: dict) -> list[str]:
    lines = []
    if ds is not None:
        meta = ds.meta
        samples = " ".join(f"--sample {s}={info.get('source', '?')}" for s, info in meta["samples"].items())
        patients = " ".join(
            f"--patient {s}={info['patient']}" for s, info in meta["samples"].items() if info.get("patient", s) != s
        )
        geometry = meta.get("geometry", {})
        lines.append(
            f"featcache prepare --dataset {dataset} {samples} {patients} --genes {meta['genes'].get('spec')} "
            f"--stride {geometry.get('stride_bins')} --min-tissue {geometry.get('min_tissue')}".replace("  ", " ")
            + (f" --px-per-bin {','.join(map(str, ds.renderings))}" if len(ds.renderings) > 1 else "")
        )
    for cfgs in configs.values():
        for c in cfgs:
            if c:
                lines.append(_train_command(c))
    lines += [f"train summarize --dataset {dataset}", f"analysis report --dataset {dataset}"]
    return lines


def _train_command(c: dict) -> str:
    finetune = c.get("mode") == "finetune"
    words = ["train", "finetune" if finetune else "decoder", f"--dataset {c.get('dataset')}"]
    words += [f"--encoder {c.get('encoder')}", f"--fold {c.get('fold')}"]
    if not finetune:
        words.append(f"--mode {c.get('mode')}")
    for key in ("decoder", "epochs", "batch_size", "lr", "seed", "val_fraction", "target", "score", "name", "control"):
        if c.get(key) is not None:
            option = "--decoder" if key == "decoder" else "--" + key.replace("_", "-")
            words.append(f"{option} {c[key]}")
    if c.get("loss_kind") not in (None, "mse"):
        words.append(f"--loss {c['loss_kind']}")
    if c.get("layer") is not None:
        words.append(f"--layer {c['layer']}")
    alpha = (c.get("ridge") or {}).get("alpha") if c.get("decoder") == "ridge" else None
    if alpha not in (None, "cv"):
        words.append(f"--alpha {alpha}")
    if finetune:
        for key in ("encoder_lr", "micro_batch", "weights"):
            if c.get(key) is not None:
                words.append(f"--{key.replace('_', '-')} {c[key]}")
    return " ".join(words)


# --------------------------------------------------------------------------- HTML pieces
def _e(v) -> str:
    return html.escape(str(v))


def _num(v) -> float:
    return np.nan if v is None else float(v)


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _seeds(r: dict) -> str:
    seeds = r.get("seeds")
    if seeds is None:
        per_seed = r.get("per_seed")
        seeds = sorted(map(str, per_seed)) if isinstance(per_seed, dict) else []
    if not seeds and (r.get("settings") or {}).get("seed") is not None:
        seeds = [r["settings"]["seed"]]
    return ", ".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds)


def _floor(r: dict):
    """The training-mean floor: the file's own floor when it has one, else the mean over folds of its mse."""
    for key in ("floor", "training_mean_floor"):
        v = r.get(key)
        if isinstance(v, dict) and "mse" in v:
            v = v["mse"]
        if isinstance(v, dict):
            v = v.get("mean")
        if isinstance(v, (int, float)):
            return float(v)
    vals = [f.get("baseline_mean_mse") for f in r.get("fold_results", {}).values()]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _td(v, code: bool = False) -> str:
    inner = f"<code>{_e(v)}</code>" if code else _e(v)
    return f"<td data-value='{_e(v)}'>{inner}</td>"


def _plain_td(v, digits: int = 4) -> str:
    value = "" if v is None or not np.isfinite(float(v)) else repr(float(v))  # NaN: empty, sorted last
    return f"<td class='num' data-value='{value}'>{_fmt(v, digits)}</td>"


def _metric_td(run: str, metric: str, stat) -> str:
    stat = stat if isinstance(stat, dict) else {}
    mean, spread = stat.get("mean"), stat.get("std", stat.get("spread"))
    value = "" if mean is None else repr(float(mean))
    shown = _fmt(mean) + ("" if spread is None else f" ± {_fmt(spread)}")
    return (
        f"<td class='num' data-run='{_e(run)}' data-metric='{_e(metric)}' data-value='{value}' "
        f"title='n = {_e(stat.get('n', '?'))} folds'>{shown}</td>"
    )


def _table(ident: str, head: list[str], rows: list[str], numeric_from: int) -> str:
    th = "".join(
        f"<th data-kind='{'num' if i >= numeric_from else 'text'}' tabindex='0'>{_e(h)}</th>"
        for i, h in enumerate(head)
    )
    body = "".join(rows)
    return f"<div class='wide'><table id='{ident}' class='sortable'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


def _listing(items, key: str) -> str:
    if isinstance(items, dict):
        items = [{"run": k, **(v if isinstance(v, dict) else {"detail": v})} for k, v in items.items()]
    lines = []
    for it in items:
        if isinstance(it, dict):
            name = it.get("run") or it.get("key") or it.get("name") or "?"
            rest = {k: v for k, v in it.items() if k not in ("run", "key", "name")}
            lines.append(f"<li><b>{_e(name)}</b> <code>{_e(json.dumps(rest, sort_keys=True))}</code></li>")
        else:
            lines.append(f"<li>{_e(it)}</li>")
    return f"<ul class='{_e(key)}'>{''.join(lines)}</ul>"


def _img(path: Path, caption: str, cls: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f"<figure class='{cls}'><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1600px;
       padding: 1rem 2rem 4rem; color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { border-bottom: 2px solid #0072B2; padding-bottom: 0.2rem; }
nav a { color: #0072B2; } .meta { color: #555; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.35rem; text-align: left; white-space: nowrap; }
th { background: #f2f5f8; cursor: pointer; user-select: none; position: sticky; top: 0; white-space: normal;
     vertical-align: bottom; }
td code { white-space: normal; font-size: 0.75rem; }
th[aria-sort='ascending']::after { content: ' \\25B2'; } th[aria-sort='descending']::after { content: ' \\25BC'; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
.wide { overflow-x: auto; max-height: 70vh; }
figure { margin: 0.8rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.figs { display: flex; flex-wrap: wrap; gap: 0 1.2rem; align-items: flex-start; }
.figs figure { max-width: 660px; } figcaption { color: #555; font-size: 0.85rem; }
pre { background: #f6f6f6; padding: 0.6rem; white-space: pre-wrap; font-size: 0.8rem; }
dt { font-weight: 600; margin-top: 0.5rem; } dd { margin-left: 1rem; }
"""

# Click (or Enter on) a header: sort the table's rows by that column, numbers as numbers, empty and NaN cells last.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    function sortBy() {
      var up = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
      var numeric = th.dataset.kind === 'num', body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var v = row.cells[col].dataset.value;
        if (!numeric) return v;
        var x = v === '' ? NaN : parseFloat(v);
        return isFinite(x) ? x : null;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        var c = numeric ? x - y : String(x).localeCompare(String(y));
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener('click', sortBy);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sortBy(); });
  });
});
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<title>{title}</title><style>{style}</style></head>
<body>
<!--BODY-->
<script>{script}</script>
</body></html>
"""
