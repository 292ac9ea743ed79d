"""`train loocv`: every fold (each patient as the test patient) of every (encoder, mode), then the
comparison file, rebuilt from all the dataset's finished run folders (train/summary.py).
"""

from __future__ import annotations

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from train.cluster import FoldRunner, placement_lines
from train.config import MODES, TrainConfig
from train.data import FoldInputs
from train.run import check_store_mode
from train.summary import summarize


def loocv_configs(
    dataset: str, encoders: list[str], modes: list[str], folds: list[str], options: dict
) -> list[TrainConfig]:
    """One TrainConfig per (encoder, mode, seed, lr trial, fold); fine-tune-only options apply to fine-tune runs only.

    ``options`` are TrainConfig fields, plus ``seeds`` (a list: each seed its own run folders, overriding
    ``seed``) and ``lr_grid`` (every lr of the grid is trained for every fold, the same budget for every encoder;
    train/summary.py keeps the one with the best validation pcc_gene per fold and seed).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise FeatcacheError(f"--modes: unknown mode(s) {', '.join(unknown)}; use {', '.join(MODES)}.")
    if not encoders or not modes:
        raise FeatcacheError("--encoders and --modes each need at least one name.")
    options = dict(options)
    seeds = options.pop("seeds", None) or [options.pop("seed", TrainConfig.seed)]
    options.pop("seed", None)
    grid = options.pop("lr_grid", None)
    if len(set(seeds)) != len(seeds):
        raise FeatcacheError(f"--seeds {','.join(map(str, seeds))}: each seed once.")
    lrs = sorted(grid) if grid else [options.pop("lr", TrainConfig.lr)]
    options.pop("lr", None)
    extra = {"lr_grid": tuple(sorted(grid))} if grid else {}
    layer = options.pop("layer", None)  # cached runs only: fine-tune runs train the encoder's final grid
    return [
        TrainConfig.from_options(
            dataset=dataset,
            encoder=e,
            mode=m,
            fold=f,
            seed=s,
            lr=lr,
            layer=None if m == "finetune" else layer,
            **extra,
            **options,
        ).validate()
        for e in encoders
        for m in modes
        for s in seeds
        for lr in lrs
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
    tensorboard: bool = False,
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
    stores = {(c.encoder, c.mode, c.seed if c.mode == "random" else 0): c for c in configs if not c.finetune}
    for (e, mode, seed), cfg in stores.items():
        store = ws.feature_store(dataset, e, mode == "random", seed)
        check_store_mode(cfg, store, FoldInputs(ds, store, cfg.layer).identity)
    runtime = {
        "device": device,
        "in_memory": in_memory,
        "overwrite": overwrite,
        "show_progress": show_progress,
        "tensorboard": tensorboard,
    }
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
    names = list(
        dict.fromkeys(st.encoder for st in ws.feature_stores(dataset) if st.random == random and st.is_complete())
    )
    if not names:
        raise FeatcacheError(
            f"no complete feature store for dataset {dataset!r} in {ws.features_dir(dataset)}; make one with "
            f"`{ws.feature_store(dataset, 'NAME', random).make_hint}`."
        )
    return names
