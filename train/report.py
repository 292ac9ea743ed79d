"""How results are shown in a terminal: the comparison table."""

from __future__ import annotations

from rich.table import Table

COLUMNS = (
    ("pcc_gene", "pcc_gene"),
    ("pearson_r", "pearson_r (global)"),
    ("spearman_rho", "spearman (global)"),
    ("ssim_st", "ssim_st"),
    ("mse", "mse"),
    ("noise_ceiling_pcc_gene", "noise ceiling"),
)


def comparison_table(res: dict) -> Table:
    """One row per run of the comparison file, best pcc_gene first; mean ± population std over folds, and the std of
    the seeds' leave-one-patient-out means (with several seeds)."""
    table = Table(title=f"leave-one-patient-out, dataset {res['about']['dataset']!r} (mean ± std over folds)")
    table.add_column("run", no_wrap=True)
    for _, label in COLUMNS:
        table.add_column(label, no_wrap=True)
    table.add_column("seeds sd", no_wrap=True)  # pcc_gene: the std of the seeds' LOOCV means
    fmt = lambda s: "—" if not s or s.get("mean") is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    for name, r in sorted(res["results"].items(), key=lambda kv: -(kv[1]["pcc_gene"]["mean"] or -9)):
        over_seeds = r["pcc_gene"].get("std_over_seeds")
        table.add_row(
            name, *(fmt(r.get(key)) for key, _ in COLUMNS), "—" if over_seeds is None else f"{over_seeds:.3f}"
        )
    return table
