"""Training curves of a run: training loss and validation ``pcc_gene`` per epoch of every fold, from ``log.jsonl``.

Each fold is one colour in both panels; the epoch the run kept (``selected_epoch`` of its metrics)
is marked with a ring on both. Drawn with matplotlib's object API, as every figure of stage 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.figures import OKABE_ITO, _figure, _style
from featcache.stores import RunDir, Workspace


def run_folds(ws: Workspace, run: dict) -> dict[str, RunDir]:
    """fold -> run folder of one run of the comparison file (the folds whose folder is in the workspace)."""
    out = {}
    for fold, f in sorted(run.get("fold_results", {}).items()):
        if f.get("run_dir") and (ws.root / f["run_dir"]).is_dir():
            out[fold.removeprefix("test_")] = RunDir(ws.root / f["run_dir"])
    return out


def curve_data(run: dict, folds: dict[str, RunDir]) -> dict[str, dict]:
    """fold -> {epoch, train_loss, val_pcc_gene (lists, None where not measured), selected (epoch or None)}."""
    out = {}
    for fold, rd in folds.items():
        log = rd.read_log()
        selected = (run.get("fold_results", {}).get(f"test_{fold}") or {}).get("selected_epoch")
        out[fold] = {
            "epoch": [r["epoch"] for r in log],
            "train_loss": [r.get("train_loss") for r in log],
            "val_pcc_gene": [r.get("val_pcc_gene") for r in log],
            "selected": selected,
        }
    return out


def _values(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def draw_training_curves(name: str, curves: dict[str, dict], path: Path) -> Path:
    """Two panels (training loss, validation pcc_gene) per epoch, one line per fold; the kept epoch ringed."""
    with _style():
        fig, (loss_ax, pcc_ax) = _figure(9.0, 3.2, ncols=2, layout="constrained")
        for i, (fold, c) in enumerate(curves.items()):
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            epoch, loss, pcc = np.array(c["epoch"]), _values(c["train_loss"]), _values(c["val_pcc_gene"])
            loss_ax.plot(epoch, loss, marker=".", color=colour, label=f"fold {fold}")
            pcc_ax.plot(epoch, pcc, marker=".", color=colour, label=f"fold {fold}")
            if c["selected"] is not None and c["selected"] in c["epoch"]:
                k = c["epoch"].index(c["selected"])
                for ax, v in ((loss_ax, loss[k]), (pcc_ax, pcc[k])):
                    if np.isfinite(v):
                        ax.scatter([c["selected"]], [v], s=90, facecolors="none", edgecolors=colour, lw=1.6, zorder=4)
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("training loss (masked MSE)")
        pcc_ax.set_xlabel("epoch")
        pcc_ax.set_ylabel("validation pcc_gene")
        if not any(np.isfinite(_values(c["val_pcc_gene"])).any() for c in curves.values()):
            note = "no validation region\n(the last epoch is kept)"
            pcc_ax.text(0.5, 0.5, note, ha="center", va="center", transform=pcc_ax.transAxes)
        loss_ax.set_title(f"{name}: training loss")
        pcc_ax.set_title("validation pcc_gene (ring: epoch kept)")
        pcc_ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return path
