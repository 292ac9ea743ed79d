"""`train loocv`: every fold (each patient as the test patient) of every (encoder, mode), then the
comparison file, rebuilt from all the dataset's finished run folders (train/summary.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from featcache.errors import FeatcacheError
from featcache.stores import Workspace
from train.config import MODES, TrainConfig
from train.data import FoldInputs
from train.run import train_fold
from train.summary import summarize


def _job(task: tuple) -> tuple:
    cfg, workspace, runtime, jobs = task
    if jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    train_fold(cfg, workspace, **runtime)


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
    tensorboard: bool = False,
) -> dict:
    """Train every fold of every (encoder, mode) and write the comparison file.

    Every feature store is checked before any training starts; ``options`` are TrainConfig fields.
    """
    ws = Workspace.resolve(workspace)
    ds = ws.open_dataset(dataset)
    if len(ds.patients) < 2:
        raise FeatcacheError(
            f"dataset {dataset!r} has {len(ds.patients)} patient(s); leave-one-patient-out needs two or more."
        )
    if jobs < 1:
        raise FeatcacheError(f"--jobs {jobs}: must be at least 1.")
    configs = loocv_configs(dataset, encoders, modes, list(ds.patients), options or {})
    for e, random in {(c.encoder, c.mode == "random") for c in configs if not c.finetune}:
        FoldInputs(ds, ws.feature_store(dataset, e, random))
    runtime = {
        "device": device,
        "in_memory": in_memory,
        "overwrite": overwrite,
        "show_progress": show_progress and jobs == 1,
        "tensorboard": tensorboard,
    }
    tasks = [(cfg, str(ws.root), runtime, jobs) for cfg in configs]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(_job, tasks))
    else:
        for t in tasks:
            _job(t)
    return summarize(dataset, ws.root)


def encoders_with_features(dataset: str, mode: str, workspace=None) -> list[str]:
    """Encoders with a complete feature store of the dataset for this mode (random-init stores for ``random``):
    what `train decoder` trains when no --encoder is given."""
    ws = Workspace.resolve(workspace)
    random = mode == "random"
    names = [st.encoder for st in ws.feature_stores(dataset) if st.random == random and st.is_complete()]
    if not names:
        raise FeatcacheError(
            f"no complete feature store for dataset {dataset!r} in {ws.root}; make one with "
            f"`{ws.feature_store(dataset, 'NAME', random).make_hint}`."
        )
    return names
