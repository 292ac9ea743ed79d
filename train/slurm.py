"""Dask workers as Slurm jobs, through dask-jobqueue's ``SLURMCluster`` (`train loocv --slurm-partition P ...`).

Each Slurm job runs one single-threaded Dask worker (``dask worker`` under ``sbatch``); with
``--slurm-gpus N`` it asks Slurm for N GPUs (``--gres=gpu:N``) and tells Dask it holds ``GPU=N``,
so GPU tasks go only there. Settings come, in this order of strength, from the command line,
from a YAML file the user keeps (``--slurm-config FILE``: dask-jobqueue's own format, a
``jobqueue: slurm:`` mapping, or the same keys at top level), and from dask's configuration
(``~/.config/dask/jobqueue.yaml``). The workers must import the same code and see the same
workspace: the job script exports ``PYTHONPATH`` and starts the same Python as this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from featcache.errors import FeatcacheError


def read_config(path: str | os.PathLike) -> dict:
    """The SLURMCluster keywords a YAML file holds (``jobqueue: slurm: {...}`` or the keys at top level)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FeatcacheError(f"--slurm-config {p}: no such file; write one (README, 'Slurm') or leave it out.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FeatcacheError(f"--slurm-config {p} is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if isinstance(data, dict) and isinstance(data.get("jobqueue"), dict):
        data = data["jobqueue"].get("slurm") or {}
    if not isinstance(data, dict):
        raise FeatcacheError(f"--slurm-config {p}: expected a mapping of SLURMCluster settings (queue, memory, ...).")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def slurm_cluster(
    partition: str | None = None,
    gpus: int = 0,
    memory: str | None = None,
    walltime: str | None = None,
    cores: int | None = None,
    config: str | None = None,
    extra: dict | None = None,
):
    """A ``dask_jobqueue.SLURMCluster`` whose jobs each run one worker of this toolkit (scale it to start jobs)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise FeatcacheError("--slurm-*: dask-jobqueue is not installed; `pip install dask-jobqueue`.") from None
    kw = read_config(config) if config else {}
    for key, value in (("queue", partition), ("memory", memory), ("walltime", walltime), ("cores", cores)):
        if value is not None:
            kw[key] = value
    kw.setdefault("cores", 1)
    kw.setdefault("memory", "8GB")
    kw.setdefault("processes", 1)
    kw.setdefault("python", sys.executable)
    kw.setdefault("scheduler_options", {"dashboard_address": None})
    worker_extra = list(kw.pop("worker_extra_args", []) or [])
    prologue = list(kw.pop("job_script_prologue", []) or [])
    directives = list(kw.pop("job_extra_directives", []) or [])
    if gpus:
        if gpus < 0:
            raise FeatcacheError(f"--slurm-gpus {gpus}: must be 0 or more.")
        directives.append(f"--gres=gpu:{gpus}")
        worker_extra += ["--resources", f"GPU={gpus}"]
    if os.environ.get("PYTHONPATH"):
        prologue.append(f"export PYTHONPATH={os.environ['PYTHONPATH']}")
    kw.update(worker_extra_args=worker_extra, job_script_prologue=prologue, job_extra_directives=directives)
    kw.update(extra or {})
    try:
        return SLURMCluster(**kw)
    except (TypeError, ValueError) as exc:
        raise FeatcacheError(f"Slurm settings refused by dask-jobqueue: {exc}.") from None
