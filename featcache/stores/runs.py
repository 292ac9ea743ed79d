"""The run folder: ``runs/<dataset>/<encoder>/<run>/fold-<fold>/`` (docs/design.md §7). This file is its format.

::

    config.json        every setting that determines the result, and its sha256 (``config_sha256``)
    log.jsonl          one line per finished epoch (train loss, validation loss and pcc_gene, seconds)
    train_state.pt     model + optimizer + RNG state after a finished epoch (saved when cheap enough; resuming)
    best-<epoch>.pt    the best validation epoch's weights at that state (for resuming)
    checkpoint.pt      the selected decoder (and encoder, when fine-tuned) with the target transform
    predictions.zarr   pred, truth, mask (patch, gene, row, col) of the test patient, origins as coords
    metrics.json       the test metrics, and their own sha256 (``metrics_sha256``)
    tensorboard/       TensorBoard event files of the epochs (training with ``--tensorboard``)
    ridge.npz          ``--decoder ridge`` only, instead of log, state and checkpoint: the fitted scaler, PCA and
                       ridge as plain arrays, the α grid and inner scores, the config's sha256 (train/ridge.py)

Every ``.pt`` file holds tensors and plain data only and is read with ``weights_only=True``: a
run folder can come from anywhere (a shared workspace, an archive), so nothing in it may run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import xarray as xr

from featcache.errors import FeatcacheError
from featcache.stores.files import (
    append_line,
    create_exclusive,
    is_temporary,
    process_alive,
    read_json,
    staged_dir,
    write_bytes,
    write_json,
    write_text,
)
from featcache.stores.zarrio import consolidate, create_array, open_local, write_origins, write_strings

log = logging.getLogger("featcache.runs")

FOLD_PREFIX = "fold-"


def fold_folder(fold: str, seed: int = 0, lr: float | None = None) -> str:
    """A fold's folder name: ``fold-<fold>``, then ``-seed<seed>`` for seeds other than 0 and ``-lr<lr>`` for a
    trial of an lr grid (docs/design.md §7)."""
    return f"{FOLD_PREFIX}{fold}" + (f"-seed{seed}" if seed else "") + (f"-lr{lr:g}" if lr is not None else "")


def _config_folder(config: dict) -> str:
    """The fold folder a run's config.json puts it in."""
    lr = config.get("lr") if config.get("lr_grid") else None
    return fold_folder(str(config.get("fold")), int(config.get("seed") or 0), lr)


LOCK = ".writer.lock"  # the process writing the folder now: {"pid", "host", "since"} (RunDir.writer)
UNHASHED = ("config_sha256", "provenance")  # config.json keys outside its hash: the hash itself, where it ran


def config_digest(config: dict) -> str:
    """The sha256 a run's settings are known by: config.json without its hash and provenance, keys sorted."""
    body = {k: v for k, v in config.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def metrics_digest(metrics: dict) -> str:
    """The sha256 metrics.json records of itself: every entry but ``metrics_sha256``, keys sorted."""
    body = {k: v for k, v in metrics.items() if k != "metrics_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_torch(obj, path: Path) -> None:
    """torch.save through memory and a temp file: a kill leaves the old file or the new one, a full disk an OSError."""
    import torch  # imported here: the store layer is used by commands that need no torch (prepare)

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def load_torch(path: Path):
    """Tensors and plain data only; a file that needs code to load is refused, never executed."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FeatcacheError(
            f"refusing to load {path}: it is not plain tensors and data (loading it would run code from the file: "
            f"{str(exc).splitlines()[0][:120]}). Delete it, or the whole run folder, and train again."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FeatcacheError(
            f"cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}); the file is damaged. "
            "Delete it, or rerun with --overwrite."
        ) from None


class RunDir:
    """One training run of one fold: ``runs/<dataset>/<encoder>/<run>/fold-<patient>/``.

    ``config.json`` (every setting, the seed, the inputs' identity), ``log.jsonl`` (one line per
    epoch), the training state while it runs, ``checkpoint.pt`` (selected decoder, target
    transform: plain tensors), ``predictions.zarr`` and ``metrics.json`` once finished.

    Examples
    --------
    >>> run = Workspace.resolve().run("demo", "uni2h", "frozen", "P5")
    >>> run.read_metrics()["pcc_gene"]
    >>> run.open_predictions().pred.sel(gene="EPCAM")
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def fold(self) -> str:
        return self.path.name.removeprefix(FOLD_PREFIX)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ config
    def read_config(self) -> dict | None:
        """``config.json`` (None when the folder has none yet): the TrainConfig fields, the seed, the
        feature store's or encoder's identity, the dataset fingerprint, patching and panel gene ids."""
        return read_json(self.file("config.json"))

    def verified_config(self) -> dict:
        """``config.json``, once the folder is shown to agree with itself: the settings hash to the recorded
        ``config_sha256`` (nothing was edited after training) and the folder sits where those settings put it.

        Every reader of a run folder (predict, summarize, compare, export, figures, resume) goes through this
        (directly or through :meth:`read_metrics`, :meth:`load_checkpoint`, :meth:`open_predictions`), so a
        folder copied from elsewhere is used only when it is internally consistent.
        """
        path = self.file("config.json")
        config = self.read_config()
        if config is None:
            raise FeatcacheError(
                f"{path} is missing: {self.path} is not a featcache run folder. Train it with `train decoder` "
                "or `train loocv`."
            )
        edited = "the checkpoint and metrics beside it were made with other settings"
        _check_digest(path, config, "config_sha256", config_digest(config), edited)
        self._check_place(config)
        return config

    def _check_place(self, config: dict) -> None:
        """A fold folder's name is its fold; inside a workspace's ``runs/`` its parents name the run, the encoder
        and the dataset (a folder copied elsewhere under another name is still the same run)."""
        p = self.path
        if not p.name.startswith(FOLD_PREFIX):
            return
        pairs = [("fold folder", p.name, _config_folder(config))]
        if len(p.parents) > 3 and p.parents[3].name == "runs":
            pairs += [("run", p.parent.name, config.get("run")), ("encoder", p.parents[1].name, config.get("encoder"))]
            pairs += [("dataset", p.parents[2].name, config.get("dataset"))]
        for what, found, recorded in pairs:
            if found != str(recorded):
                raise FeatcacheError(
                    f"{self.file('config.json')} records {what} {recorded!r}, but the folder says {found!r}: the "
                    "run folder was moved or copied into the wrong place. Put it at "
                    f"runs/{config.get('dataset')}/{config.get('encoder')}/{config.get('run')}/"
                    f"{_config_folder(config)}/."
                )

    def claim(self, config: dict, overwrite: bool, variant_hint: str = "") -> str:
        """Take the folder for ``config``: ``new``, ``resume`` (same settings, unfinished) or ``done``.

        A folder holding a run with other settings is refused, or with ``overwrite`` emptied
        first. Nothing is written here: :meth:`write_config` does that once the run can start.
        """
        old = self.read_config()
        if old is None and self.path.exists() and any(not _ours(p.name) for p in self.path.iterdir()):
            if not overwrite:
                raise FeatcacheError(
                    f"{self.path} holds files but no config.json; it is not a run folder featcache "
                    "can resume. Pass --overwrite to replace it" + variant_hint + "."
                )
        if old is not None and old.get("config_sha256") != config["config_sha256"]:
            if not overwrite:
                raise FeatcacheError(
                    f"run folder {self.path} holds a run with other settings. Pass --overwrite to "
                    "replace it" + variant_hint + "."
                )
            old = None
        if old is None:
            if overwrite and self.path.exists():
                self._empty()
            return "new"
        return "done" if self.file("metrics.json").is_file() else "resume"

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.file("config.json"), config)

    # ------------------------------------------------------------------ log and state
    def read_log(self) -> list[dict]:
        """One dict per finished epoch: train_loss, val_loss, val_pcc_gene, seconds."""
        path = self.file("log.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files of the log rows (``--tensorboard``): ``tensorboard --logdir runs/<dataset>``."""
        return self.file("tensorboard")

    def append_log(self, row: dict) -> None:
        append_line(self.file("log.jsonl"), json.dumps(row))

    def rewrite_log(self, rows: list[dict]) -> None:
        write_text(self.file("log.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    def save_state(self, state: dict) -> None:
        save_torch(state, self.file("train_state.pt"))

    def load_state(self) -> dict | None:
        path = self.file("train_state.pt")
        return load_torch(path) if path.is_file() else None

    def save_best(self, epoch: int, best: dict) -> None:
        save_torch(best, self.file(f"best-{epoch}.pt"))

    def load_best(self, epoch: int) -> dict:
        path = self.file(f"best-{epoch}.pt")
        if not path.is_file():
            raise FeatcacheError(
                f"{path} is missing, though train_state.pt names it; the run folder is damaged. Rerun with --overwrite."
            )
        return load_torch(path)

    def drop_bests(self, keep: int | None = None) -> None:
        """Remove best-<epoch>.pt files other than ``keep``'s."""
        for p in self.path.glob("best-*.pt"):
            if p.name != f"best-{keep}.pt":
                p.unlink(missing_ok=True)

    def clear_state(self) -> None:
        self.file("train_state.pt").unlink(missing_ok=True)
        self.drop_bests()

    # ------------------------------------------------------------------ one writer at a time
    def writer(self, take: bool = True) -> RunLock:
        """Hold the folder for this process while it trains (``with run.writer(): ...``); another process
        that holds it makes this raise, naming it. ``take=False`` (the other ranks under torchrun) holds nothing."""
        return RunLock(self.file(LOCK), take)

    def _empty(self) -> None:
        """Remove everything in the folder but the writer's lock (``--overwrite``)."""
        for p in self.path.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # ------------------------------------------------------------------ results
    def save_checkpoint(self, checkpoint: dict) -> None:
        save_torch(checkpoint, self.file("checkpoint.pt"))

    def load_checkpoint(self) -> dict:
        """``checkpoint.pt``, refused unless it was trained with this folder's ``config.json`` (its recorded
        ``config_sha256``, mode, decoder and gene panel)."""
        config = self.verified_config()
        path = self.file("checkpoint.pt")
        if not path.is_file():
            raise FeatcacheError(f"{self.path} has no checkpoint.pt: the run is not finished.")
        ck = load_torch(path)
        if not isinstance(ck, dict) or ck.get("config_sha256") != config["config_sha256"]:
            raise FeatcacheError(
                f"{path} was not trained with the settings of {self.file('config.json')} (its config_sha256 "
                "differs): the checkpoint comes from another run. Copy the whole run folder, or train it again "
                "with --overwrite."
            )
        for key, want in (
            ("mode", config.get("mode")),
            ("decoder", config.get("decoder")),
            ("genes", config.get("genes")),
            ("loss", config.get("loss_kind")),  # a count-loss run's (MSE runs record none)
        ):
            if want is not None and ck.get(key) != want:
                raise FeatcacheError(
                    f"{path} holds {key} {str(ck.get(key))[:60]!r} but {self.file('config.json')} says "
                    f"{str(want)[:60]!r}; the run folder is inconsistent. Train it again with --overwrite."
                )
        return ck

    def is_finished(self) -> bool:
        return self.file("metrics.json").is_file()

    def read_metrics(self) -> dict:
        """``metrics.json``: pcc_gene, pcc_global, spearman_gene, spearman_global, mse, ssim_st, per-gene
        values, the per-gene-mean baseline and (synthetic data) the noise ceiling. Raises FeatcacheError
        when the run has not finished, or when the file was written by another run or edited since (its values
        no longer hash to its ``metrics_sha256``)."""
        path = self.file("metrics.json")
        m = read_json(path)
        if m is None:
            raise FeatcacheError(
                f"{self.path} has no metrics.json: the run is not finished. Finish it with the same `train` "
                "command (it resumes), or delete the folder."
            )
        config = self.verified_config()
        if m.get("config_sha256") != config["config_sha256"]:
            raise FeatcacheError(
                f"{path} was not written by the run of {self.file('config.json')} (its config_sha256 differs): "
                "the metrics come from another run. Copy the whole run folder, or train it again with --overwrite."
            )
        _check_digest(
            path, m, "metrics_sha256", metrics_digest(m), "they are not the scores of the predictions beside it"
        )
        return m

    def write_metrics(self, metrics: dict) -> None:
        """``metrics.json`` with its own sha256 (``metrics_sha256``), which :meth:`read_metrics` checks."""
        metrics = {k: v for k, v in metrics.items() if k != "metrics_sha256"}
        write_json(self.file("metrics.json"), {**metrics, "metrics_sha256": metrics_digest(metrics)})

    @property
    def predictions_path(self) -> Path:
        return self.file("predictions.zarr")

    def write_predictions(
        self, pred, truth, mask, origins, samples, genes, gene_ids, attrs: dict, extra: dict | None = None
    ) -> None:
        """The test patient's predictions; ``samples`` names each patch's section (a coordinate over patch);
        ``extra``: more (patch, gene, row, col) arrays beside ``pred`` and ``truth`` (a count run's ``log_rate``).
        The store records the ``config_sha256`` of the run's config.json, which :meth:`open_predictions` checks:
        predictions copied in from another run are refused."""
        attrs = {**attrs, "config_sha256": (self.read_config() or {}).get("config_sha256")}
        write_prediction_store(
            self.predictions_path,
            attrs,
            origins,
            genes,
            gene_ids,
            {"pred": pred, "truth": truth, **(extra or {})},
            mask,
            samples=samples,
        )

    def open_predictions(self) -> xr.Dataset:
        """The test patient's predictions, lazily.

        Returns
        -------
        xarray.Dataset
            ``pred`` and ``truth`` float32 (patch, gene, row, col) in the run's target space, ``mask``
            bool (patch, row, col) of the scored bins, ``origin`` and each patch's ``sample``.
        """
        config = self.verified_config()
        path = self.predictions_path
        if not path.exists():
            raise FeatcacheError(f"predictions of run not found: {path}")
        try:
            ds = xr.open_zarr(path, consolidated=False)
            genes = [str(g) for g in ds["gene"].values]
            missing = [v for v in ("pred", "truth", "mask", "origin") if v not in ds.variables]
        except Exception as exc:  # a damaged store fails in zarr, numcodecs or xarray, each its own way
            raise FeatcacheError(
                f"cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}); the predictions are damaged. "
                "Train the run again with --overwrite."
            ) from None
        if missing:
            raise FeatcacheError(f"{path} has no {', '.join(missing)} array; the predictions are damaged.")
        ds.encoding["source"] = str(path)  # named by readers whose lazy reads fail (a damaged chunk)
        if ds.attrs.get("config_sha256") != config["config_sha256"]:
            raise FeatcacheError(
                f"{path} was not written by the run of {self.file('config.json')} (its config_sha256 "
                f"{'differs' if ds.attrs.get('config_sha256') else 'is missing'}): the predictions come from another "
                "run. Copy the whole run folder, or train it again with --overwrite."
            )
        if config.get("genes") is not None and genes != list(config["genes"]):
            raise FeatcacheError(
                f"{path} holds another gene panel than {self.file('config.json')}: the predictions come from "
                "another run. Copy the whole run folder, or train it again with --overwrite."
            )
        return ds


def _check_digest(path: Path, record: dict, key: str, digest: str, so: str) -> None:
    """``record[key]`` is the ``digest`` of the rest of ``record``: the file was not edited after the run wrote it
    (``so``: what an edit would mean for the files beside it)."""
    if record.get(key) != digest:
        raise FeatcacheError(
            f"{path} was changed after the run wrote it (or has no {key}): its values no longer hash to its {key}, "
            f"so {so}. Restore the original {path.name}, or train the run again with --overwrite."
        )


def _ours(name: str) -> bool:
    """The writer's lock, or a temp file a writer killed mid-write left: no run data."""
    return name == LOCK or is_temporary(name)


class RunLock:
    """``.writer.lock`` in a run folder: created exclusively with the holder's pid, host and start time (and, in a
    Dask worker, the worker's and its scheduler's addresses), removed when it lets go. A lock whose holder is dead is
    cleared: a process of this host that is gone, or a Dask worker that its scheduler no longer lists (a lost node
    whose fold Dask runs again elsewhere). Any other lock of another host cannot be checked from here, so it is
    refused with its holder named."""

    def __init__(self, path: Path, take: bool):
        self.path, self.take, self.held, self.made_folder = Path(path), take, False, False

    def __enter__(self) -> RunLock:
        if not self.take:
            return self
        self.made_folder = not self.path.parent.exists()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        me.update(self._dask_worker() or {})
        for _ in range(5):
            if create_exclusive(self.path, (json.dumps(me) + "\n").encode()):
                self.held = True
                return self
            holder = self._holder()
            if holder is not None and not self._dead(holder):
                raise FeatcacheError(self._busy(holder))
            self._clear_stale(holder)
        raise FeatcacheError(f"could not take {self.path}: other processes keep taking it; run again.")

    def __exit__(self, *_) -> None:
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.made_folder:
            try:
                self.path.parent.rmdir()  # only when empty: a run refused before it wrote anything leaves no folder
            except OSError:
                pass

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (its writer died while writing it): stale
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _dask_worker() -> dict | None:
        """This process's Dask worker and scheduler addresses, when it runs a Dask task."""
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            return None
        return {"worker": worker.address, "scheduler": worker.scheduler.address}

    def _dead(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        if holder.get("host") == socket.gethostname():
            return not process_alive(pid)
        return self._worker_gone(holder)

    def _worker_gone(self, holder: dict) -> bool:
        """Whether another host's holder was a Dask worker that our scheduler no longer has (its node died, so
        Dask runs its task again here). Only our own scheduler can say: a lock of another cluster is kept."""
        mine = self._dask_worker()
        worker = holder.get("worker")
        if not mine or not isinstance(worker, str) or holder.get("scheduler") != mine["scheduler"]:
            return False
        from distributed import get_client

        try:
            workers = get_client().scheduler_info()["workers"]
        except Exception:  # noqa: BLE001 - a scheduler that cannot answer: judge the lock alive, as any other host's
            return False
        if worker in workers:
            return False
        log.warning(
            "%s: its holder, Dask worker %s (pid %s on host %s), is no longer in the scheduler's workers; "
            "clearing its lock (its task runs again here)",
            self.path,
            worker,
            holder.get("pid"),
            holder.get("host"),
        )
        return True

    def _busy(self, holder: dict) -> str:
        host = holder.get("host")
        here = host == socket.gethostname()
        return (
            f"run folder {self.path.parent} is being written by another featcache process (pid {holder.get('pid')} "
            f"on {'this host' if here else 'host ' + str(host)}"
            + (f", Dask worker {holder['worker']}" if holder.get("worker") else "")
            + f", since {holder.get('since')}). Wait for it to finish "
            "and run again (a finished run is reused), or stop it"
            + (f" (kill {holder.get('pid')})." if here else f"; if that process is gone, delete {self.path}.")
        )

    def _clear_stale(self, holder: dict | None) -> None:
        """Set the dead holder's lock aside and delete it; a lock taken meanwhile by a live process is put back."""
        if holder is None:
            return
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text() or "{}") != holder:
                os.link(aside, self.path)  # not the one judged dead: give it back (unless a new one is there)
        except (OSError, ValueError):
            pass
        aside.unlink(missing_ok=True)


def write_prediction_store(
    path: Path,
    attrs: dict,
    origins,
    genes,
    gene_ids,
    maps: dict[str, np.ndarray],
    mask: np.ndarray | None,
    dtype: str = "float32",
    samples=None,
) -> None:
    """A (patch, gene, row, col) prediction store with origins, samples and genes as coordinates, replaced whole
    (built in a hidden folder: :func:`~featcache.stores.files.staged_dir`)."""
    coords = "origin sample" if samples is not None else "origin"
    with staged_dir(path) as partial:
        root = open_local(partial, "w")
        root.attrs.update(attrs)
        for name, data in maps.items():
            n, g, r, c = data.shape
            create_array(
                root,
                name,
                shape=data.shape,
                chunks=(max(1, min(n, 32)), g, r, c),
                dtype=dtype,
                dims=("patch", "gene", "row", "col"),
                attributes={"coordinates": f"{coords} gene_id"},
            )[:] = data.astype(dtype)
        if mask is not None:
            n, r, c = mask.shape
            create_array(
                root,
                "mask",
                shape=mask.shape,
                chunks=(max(1, min(n, 32)), r, c),
                dtype="bool",
                dims=("patch", "row", "col"),
                fill_value=False,
                attributes={"coordinates": coords},
            )[:] = mask
        write_origins(root, origins)
        if samples is not None:
            write_strings(root, "sample", [str(v) for v in samples], "patch")
        write_strings(root, "gene", genes, "gene")
        write_strings(root, "gene_id", gene_ids, "gene")
        consolidate(partial)
