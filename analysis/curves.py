"""Training curves of a run: training loss and validation ``pcc_gene`` per epoch of every fold and seed, from
each run folder's ``log.jsonl``.

Each fold is one colour and each seed one line style in both panels; the epoch each seed's folder kept (its
``selected_epoch``, from the comparison file's per-seed entry) is ringed on both. Drawn with matplotlib's object
API, as every figure of stage 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.figures import OKABE_ITO, _figure, _style
from featcache.errors import FeatcacheError
from featcache.stores import RunDir, Workspace

# train/losses.py: what ``train_loss`` in log.jsonl is, by the run's loss (the comparison entry's ``loss``)
LOSS_LABELS = {"mse": "masked MSE", "poisson": "Poisson NLL", "nb": "NB NLL"}
SEED_STYLES = ("-", "--", ":", "-.")


def loss_label(loss: str | None) -> str:
    """The loss axis's label for a run's loss kind (``mse`` when the file predates count losses)."""
    kind = loss or "mse"
    return f"training loss ({LOSS_LABELS.get(kind, kind)})"


def run_folds(ws: Workspace, run: dict) -> dict[str, RunDir]:
    """fold -> the fold's ``run_dir`` (its first seed's folder) of one run of the comparison file, for the folds
    whose folder is in the workspace."""
    out = {}
    for fold, f in sorted(run.get("fold_results", {}).items()):
        if f.get("run_dir") and (ws.root / f["run_dir"]).is_dir():
            out[fold.removeprefix("test_")] = RunDir(ws.root / f["run_dir"])
    return out


def seed_entries(run: dict) -> dict[str, list[dict]]:
    """fold -> its per-seed entries (seed, run_dir, selected_epoch, ...), by seed; a fold of a file without
    ``per_seed`` is its own one entry."""
    out = {}
    for fold, f in sorted(run.get("fold_results", {}).items()):
        entries = f.get("per_seed") or [{"seed": (run.get("settings") or {}).get("seed", 0), **f}]
        out[fold.removeprefix("test_")] = sorted(entries, key=lambda e: e.get("seed") or 0)
    return out


def curve_data(ws: Workspace, run: dict) -> dict[str, dict[int, dict]]:
    """fold -> seed -> {epoch, train_loss, val_pcc_gene (lists, None where not measured), selected (epoch or
    None)} of every seed's run folder in the workspace. ``selected`` is the seed's own ``selected_epoch``: from
    its entry, else from its ``metrics.json``."""
    out: dict[str, dict[int, dict]] = {}
    for fold, entries in seed_entries(run).items():
        for e in entries:
            if not e.get("run_dir") or not (ws.root / e["run_dir"]).is_dir():
                continue
            rd = RunDir(ws.root / e["run_dir"])
            log = rd.read_log()
            selected = e["selected_epoch"] if "selected_epoch" in e else _metrics_epoch(rd)
            out.setdefault(fold, {})[int(e.get("seed") or 0)] = {
                "epoch": [r["epoch"] for r in log],
                "train_loss": [r.get("train_loss") for r in log],
                "val_pcc_gene": [r.get("val_pcc_gene") for r in log],
                "selected": selected,
            }
    return out


def _metrics_epoch(rd: RunDir):
    try:
        return rd.read_metrics().get("selected_epoch")
    except FeatcacheError:
        return None


def _values(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def draw_training_curves(name: str, curves: dict[str, dict[int, dict]], path: Path, loss: str | None = None) -> Path:
    """Two panels (training loss, validation pcc_gene) per epoch: a colour per fold, a line style per seed, each
    seed's kept epoch ringed. ``loss``: the run's loss kind (the loss axis's label)."""
    seeds = sorted({s for by_seed in curves.values() for s in by_seed})
    style = {s: SEED_STYLES[i % len(SEED_STYLES)] for i, s in enumerate(seeds)}
    with _style():
        fig, (loss_ax, pcc_ax) = _figure(9.0, 3.2, ncols=2, layout="constrained")
        handles = []
        for i, (fold, by_seed) in enumerate(curves.items()):
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            handles.append(Line2D([], [], color=colour, marker=".", label=f"fold {fold}"))
            for seed, c in sorted(by_seed.items()):
                epoch, loss_v, pcc = np.array(c["epoch"]), _values(c["train_loss"]), _values(c["val_pcc_gene"])
                for ax, v in ((loss_ax, loss_v), (pcc_ax, pcc)):
                    ax.plot(epoch, v, marker=".", color=colour, ls=style[seed], lw=1.2)
                if c["selected"] is not None and c["selected"] in c["epoch"]:
                    k = c["epoch"].index(c["selected"])
                    for ax, v in ((loss_ax, loss_v[k]), (pcc_ax, pcc[k])):
                        if np.isfinite(v):
                            ax.scatter(
                                [c["selected"]], [v], s=90, facecolors="none", edgecolors=colour, lw=1.6, zorder=4
                            )
        if len(seeds) > 1:
            handles += [Line2D([], [], color="#555555", ls=style[s], label=f"seed {s}") for s in seeds]
        for ax in (loss_ax, pcc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel(loss_label(loss))
        pcc_ax.set_xlabel("epoch")
        pcc_ax.set_ylabel("validation pcc_gene")
        if not any(np.isfinite(_values(c["val_pcc_gene"])).any() for b in curves.values() for c in b.values()):
            note = "no validation region\n(the last epoch is kept)"
            pcc_ax.text(0.5, 0.5, note, ha="center", va="center", transform=pcc_ax.transAxes)
        loss_ax.set_title(f"{name}: training loss")
        ring = "ring: epoch kept" + (" by each seed" if len(seeds) > 1 else "")
        pcc_ax.set_title(f"validation pcc_gene ({ring})")
        pcc_ax.legend(
            handles=handles, frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return path
