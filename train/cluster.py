"""Where `train loocv`'s folds run: one Dask task per fold (docs/design.md §8).

``--jobs 1`` trains the folds one after another in this process. ``--jobs N`` starts a Dask
``LocalCluster`` of N single-threaded worker processes; ``--scheduler tcp://HOST:PORT`` uses a
running cluster (workers started with ``dask worker``); ``--slurm-*`` starts workers as Slurm jobs
through dask-jobqueue (train/slurm.py). Each fold is one task:

- a task that needs a GPU (``--device cuda``) asks for the Dask resource ``GPU=1``; a worker started
  with ``--resources GPU=1`` takes it. A ``LocalCluster`` on GPUs gives worker *i* the *i*-th visible GPU
  (``CUDA_VISIBLE_DEVICES``, round robin: with more ``--jobs`` than GPUs, workers share them, said in a
  warning); folds on the CPU ask for no resource;
- a worker that dies mid-fold (killed, out of memory) is replaced by its nanny and Dask runs the task
  again elsewhere (``distributed.scheduler.allowed-failures`` times); the fold resumes from the
  training state its run folder holds (train/loop.py), so it ends exactly where an uninterrupted run does;
- a task that raises an unexpected error is retried (``retries=1``); a fold whose inputs are bad
  (a :class:`~featcache.errors.FeatcacheError`: a damaged ``train_state.pt``, a missing store chunk) is
  not retried: its message is reported at the end, and the other folds finish and are kept.

Workers import this code: they need the same ``featcache``/``train`` packages (an install, or the
same ``PYTHONPATH``, which a ``LocalCluster``'s processes inherit) and see the same workspace path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from featcache.errors import FeatcacheError
from featcache.progress import progress
from featcache.stores import Workspace

RETRIES = 1  # extra tries of a task that raised something other than a FeatcacheError


@dataclass
class TaskReport:
    """One fold's task: where it ran, how long it took, whether it resumed a saved state, its error if any."""

    label: str
    worker: str = ""
    seconds: float = 0.0
    resumed: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("label", "worker", "seconds", "resumed", "error")}


def label(cfg) -> str:
    return f"{cfg.encoder}/{cfg.run_name}/fold-{cfg.fold}"


def fold_task(cfg, workspace, runtime: dict, threads: int | None) -> dict:
    """Train one fold (the function each Dask task runs); a FeatcacheError comes back as the report's error."""
    from train.run import train_fold

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    report = TaskReport(label(cfg), worker=_where())
    run = Workspace.resolve(workspace).run(cfg.dataset, cfg.encoder, cfg.run_name, cfg.fold, cfg.seed, cfg.trial_lr)
    report.resumed = run.file("train_state.pt").is_file()
    try:
        import dask

        # the fold's own reads (xarray/dask over Zarr) run in threads of this worker: inside a Dask task the
        # default would send them to the cluster, whose single-threaded workers are all busy training folds
        with dask.config.set(scheduler="threads"):
            train_fold(cfg, workspace, **runtime)
    except FeatcacheError as exc:
        report.error = str(exc)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report.to_json()


def _where() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"in-process ({socket.gethostname()})"


class FoldRunner:
    """A context manager holding the Dask client (and the cluster it started, if any) for a LOOCV.

    Opened before anything is written, so that an unreachable scheduler ends the command at once;
    closed in ``finally``: no worker outlives the command.
    """

    def __init__(
        self,
        jobs: int = 1,
        scheduler: str | None = None,
        slurm: dict | None = None,
        device: str = "auto",
        threads: int | None = None,
    ):
        """``threads``: torch threads per LocalCluster worker (default: this machine's cores / ``jobs``)."""
        if jobs < 1:
            raise FeatcacheError(f"--jobs {jobs}: must be at least 1.")
        if scheduler and slurm:
            raise FeatcacheError("--scheduler and --slurm-* both given: use a running cluster or start one, not both.")
        self.jobs, self.scheduler, self.slurm, self.device = jobs, scheduler, slurm, device
        self.gpu = device.startswith("cuda") or bool(slurm and slurm.get("gpus"))
        self.client = self.cluster = None
        self.threads, self._threads = None, threads
        self.gpus: list[str] = []  # the GPU each LocalCluster worker sees, by worker

    @property
    def in_process(self) -> bool:
        return self.client is None

    def __enter__(self) -> FoldRunner:
        try:
            if self.scheduler:
                self.client = _connect(self.scheduler)
            elif self.slurm is not None:
                from train.slurm import slurm_cluster

                self.cluster = slurm_cluster(**self.slurm)
                self.cluster.scale(jobs=self.jobs)
                self.client = _client(self.cluster)
            elif self.jobs > 1:
                if self.device == "auto" and not self.gpu:  # auto picks the GPU where there is one: pin it too
                    import torch

                    self.gpu = torch.cuda.is_available()
                self.threads = self._threads or max(1, (os.cpu_count() or 1) // self.jobs)
                self.cluster = self._local_cluster()
                self.client = _client(self.cluster)
                self.client.wait_for_workers(self.jobs, timeout=120)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def resources(self) -> dict | None:
        """The Dask resources each fold's task asks for: one GPU, or none for folds on the CPU."""
        return {"GPU": 1} if self.gpu else None

    def _local_cluster(self):
        """N single-threaded worker processes on 127.0.0.1; on GPUs, each worker pinned to one of them."""
        from distributed import LocalCluster, Nanny

        cluster = LocalCluster(
            n_workers=0 if self.gpu else self.jobs,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # a failed fold is reported once, by us; not as Dask's log lines
        )
        if not self.gpu:
            return cluster
        try:
            visible = visible_gpus(self.device)
            if len(visible) < self.jobs:
                logging.getLogger("featcache.cluster").warning(
                    "--jobs %d on %d GPU(s): workers share them (worker i takes GPU i mod %d); give --jobs %d for "
                    "one fold per GPU",
                    self.jobs,
                    len(visible),
                    len(visible),
                    len(visible),
                )
            self.gpus = [visible[i % len(visible)] for i in range(self.jobs)]
            base = cluster.new_spec["options"]
            for i, gpu in enumerate(self.gpus):
                env = {**(base.get("env") or {}), "CUDA_VISIBLE_DEVICES": gpu}
                options = {**base, "env": env, "resources": {"GPU": 1}}
                cluster.worker_spec[i] = {"cls": Nanny, "options": options}
            cluster.scale(self.jobs)
        except BaseException:
            cluster.close()
            raise
        return cluster

    def close(self) -> None:
        for thing in (self.client, self.cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - closing what is already gone
                    pass
        self.client = self.cluster = None

    def run(self, configs: list, workspace, runtime: dict, show_progress: bool = True) -> list[dict]:
        """Every config's fold, with a progress bar over the tasks; one report per config, in order."""
        if self.in_process:
            reports = []
            with progress(disable=not show_progress) as bar:
                task = bar.add_task("folds", total=len(configs), rate="")
                for cfg in configs:
                    reports.append(fold_task(cfg, workspace, {**runtime, "show_progress": show_progress}, None))
                    bar.update(task, advance=1, rate=_rate(reports))
            return reports
        from distributed import as_completed

        quiet = {**runtime, "show_progress": False}
        if self.gpus:  # each worker sees its one GPU only, as cuda:0
            quiet["device"] = "cuda"
        futures = {
            self.client.submit(
                fold_task,
                cfg,
                workspace,
                quiet,
                self.threads,
                key=f"{label(cfg)}#{i}",
                pure=False,
                retries=RETRIES,
                resources=self.resources,
            ): i
            for i, cfg in enumerate(configs)
        }
        reports: list[dict | None] = [None] * len(configs)
        try:
            with progress(disable=not show_progress) as bar:
                task = bar.add_task("folds", total=len(configs), rate="")
                for fut in as_completed(futures, loop=self.client.loop):
                    i = futures[fut]
                    reports[i] = _result(fut, configs[i])
                    bar.update(task, advance=1, rate=_rate([r for r in reports if r]))
        finally:
            for fut in futures:
                fut.release()
        return reports


def visible_gpus(device: str = "cuda") -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (``cuda:K``: that one only)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = [g.strip() for g in env.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if ":" in device:
        k = device.split(":", 1)[1]
        if not k.isdigit() or int(k) >= len(gpus):
            raise FeatcacheError(f"--device {device}: this machine shows {len(gpus)} GPU(s); use cuda or cuda:0.")
        gpus = [gpus[int(k)]]
    if not gpus:
        raise FeatcacheError(
            f"--device {device} with --jobs: no GPU is visible here (CUDA_VISIBLE_DEVICES, torch); use --device cpu."
        )
    return gpus


def _result(fut, cfg) -> dict:
    """The task's report; a task that raised (after its retries) or whose workers kept dying becomes an error."""
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - any failure of one fold is reported, the others go on
        name = type(exc).__name__
        if name == "KilledWorker":
            text = (
                "its worker died each time it ran it (killed: out of memory, or by a signal); give the workers more "
                "memory (fewer --jobs), then run the same command again: finished folds are kept"
            )
        else:
            text = f"{name}: {str(exc)[:300]}"
        return TaskReport(label(cfg), error=text).to_json()


def _rate(done: list[dict]) -> str:
    failed = sum(1 for r in done if r["error"])
    return f"{failed} failed" if failed else ""


def _connect(address: str):
    from distributed import Client

    try:
        return Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise FeatcacheError(
            f"--scheduler {address}: cannot reach a Dask scheduler there ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}). Start one (`dask scheduler`, then `dask worker {address}` on each "
            "machine) or leave --scheduler out to run on this machine; nothing was written."
        ) from None


def _client(cluster):
    from distributed import Client

    return Client(cluster, set_as_default=False)


def placement_lines(reports: list[dict]) -> list[str]:
    """Which fold ran where and for how long, one line each (printed at the end of `train loocv`)."""
    width = max((len(r["label"]) for r in reports), default=0)
    out = []
    for r in reports:
        state = "FAILED" if r["error"] else ("resumed" if r["resumed"] else "ok")
        out.append(f"{r['label']:<{width}}  {r['worker'] or '-':<24} {r['seconds']:8.1f} s  {state}")
    return out
