"""How results are shown in a terminal: the comparison table."""

from __future__ import annotations

from rich.table import Table


def comparison_table(res: dict) -> Table:
    table = Table(title=f"leave-one-patient-out, dataset {res['summary']['dataset']!r} (mean ± std over folds)")
    for col in ("run", "pcc_gene", "pearson_r", "spearman", "ssim_st", "mse", "noise ceiling"):
        table.add_column(col, no_wrap=True)
    fmt = lambda s: "—" if s.get("mean") is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    rows = sorted(res["results"].items(), key=lambda kv: -(kv[1]["pcc_gene"]["mean"] or -9))
    for name, r in rows:
        table.add_row(
            name,
            fmt(r["pcc_gene"]),
            fmt(r["pearson_r"]),
            fmt(r["spearman_rho"]),
            fmt(r["ssim_st"]),
            fmt(r["mse"]),
            fmt(r.get("noise_ceiling_pcc_gene", {})),
        )
    return table
