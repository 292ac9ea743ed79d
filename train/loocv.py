"""`train loocv`: every fold (each patient as the test patient) of every (encoder, mode), then the
comparison file, rebuilt from all the dataset's finished run folders (train/summary.py).
"""

from __future__ import annotations

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from train.cluster import FoldRunner, placement_lines
from train.config import MODES, TrainConfig
from train.data import FoldInputs
from train.summary import summarize


def loocv_configs(
    dataset: str, encoders: list[str], modes: list[str], folds: list[str], options: dict
) -> list[TrainConfig]:
    """One TrainConfig per (encoder, mode, fold); fine-tune-only options apply to fine-tune runs only."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise FeatcacheError(f"--modes: unknown mode(s) {', '.join(unknown)}; use {', '.join(MODES)}.")
    if not encoders or not modes:
        raise FeatcacheError("--encoders and --modes each need at least one name.")
    return [
        TrainConfig.from_options(dataset=dataset, encoder=e, mode=m, fold=f, **options).validate()
        for e in encoders
        for m in modes
        for f in folds
    ]


def run_loocv(
    dataset: str,
    encoders: list[str],
    modes: list[str],
    options: dict | None = None,
    jobs: int = 1,
    workspace=None,
    device: str = "auto",
    in_memory: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
    scheduler: str | None = None,
    slurm: dict | None = None,
    runner: FoldRunner | None = None,
) -> dict:
    """Train every fold of every (encoder, mode) and write the comparison file.

    Every feature store is checked before any training starts; ``options`` are TrainConfig fields.
    Each fold is one task of ``runner`` (train/cluster.py; opened here from ``jobs``, ``scheduler`` and
    ``slurm`` when not given). The comparison's ``_tasks`` says where each fold ran and how long it took.
    A fold that fails does not stop the others: they finish and are kept (and summarized), then one
    FeatcacheError names each failed fold and its message.
    """
    ws = Workspace.resolve(workspace)
    ds = ws.open_dataset(dataset)
    if len(ds.patients) < 2:
        raise FeatcacheError(
            f"dataset {dataset!r} has {len(ds.patients)} patient(s); leave-one-patient-out needs two or more."
        )
    configs = loocv_configs(dataset, encoders, modes, list(ds.patients), options or {})
    for e, random in {(c.encoder, c.mode == "random") for c in configs if not c.finetune}:
        FoldInputs(ds, ws.feature_store(dataset, e, random))
    runtime = {"device": device, "in_memory": in_memory, "overwrite": overwrite, "show_progress": show_progress}
    if runner is None:
        with FoldRunner(jobs, scheduler, slurm, device) as own:
            reports = own.run(configs, ws, runtime, show_progress)
    else:
        reports = runner.run(configs, ws, runtime, show_progress)
    failed = [r for r in reports if r["error"]]
    comparison = summarize(dataset, ws.root) if len(failed) < len(reports) else None
    if failed:
        kept = f"; the other {len(reports) - len(failed)} fold(s) finished and are kept" if comparison else ""
        where = f" (comparison file: {comparison['_path']})" if comparison else ""
        raise FeatcacheError(
            f"{len(failed)} of {len(reports)} fold(s) failed{kept}{where}:\n"
            + "\n".join(f"  {r['label']}: {r['error']}" for r in failed)
            + "\nFix what each names and run the same command again: finished folds are reused."
        )
    comparison["_tasks"] = reports
    comparison["_placement"] = placement_lines(reports)
    return comparison


def encoders_with_features(dataset: str, mode: str, workspace=None) -> list[str]:
    """Encoders with a complete feature store of the dataset for this mode (random-init stores for ``random``):
    what `train decoder` trains when no --encoder is given."""
    ws = Workspace.resolve(workspace)
    random = mode == "random"
    names = [st.encoder for st in ws.feature_stores(dataset) if st.random == random and st.is_complete()]
    if not names:
        raise FeatcacheError(
            f"no complete feature store for dataset {dataset!r} in {ws.features_dir(dataset)}; make one with "
            f"`{ws.feature_store(dataset, 'NAME', random).make_hint}`."
        )
    return names
