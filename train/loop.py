"""The pieces of the training loop: one optimizer step, validation, prediction, the epoch loop with
resume, and torchrun (DDP) support for fine-tuning."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from featcache.device import autocast
from featcache.progress import progress
from featcache.stores import RunDir
from train.config import TrainConfig
from train.data import Batches, FoldInputs, load_targets, read_tokens
from train.events import TensorBoard
from train.losses import MSE
from train.metrics import per_gene_pearson


class Distributed:
    """torchrun support for fine-tuning: DistributedDataParallel over WORLD_SIZE processes.

    Every rank sees the same shuffled batch order and takes every world-th batch; the main rank
    keeps the log, the training state and the outputs. Without torchrun this is a no-op.
    """

    def __init__(self, finetune: bool, dev):
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if finetune else 1
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.main = self.rank == 0
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
                self.started = True

    @staticmethod
    def is_main(finetune: bool) -> bool:
        """Whether this process is the main rank (before the process group starts): the one that holds the run folder."""
        return not finetune or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0

    def wrap(self, model, dev):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def to_input(arr: np.ndarray, dev) -> torch.Tensor:
    """Cached grids become float32; uint8 image patches stay uint8 (the encoder normalises them)."""
    x = torch.from_numpy(arr).to(dev, non_blocking=True)
    return x if x.dtype == torch.uint8 else x.float()


class Stepper:
    """One optimizer step over a batch: micro-batches with gradient accumulation, augmentation,
    bf16 autocast on a GPU. The loss (``objective``, train/losses.py; masked MSE by default) is over the whole
    batch, whatever the split."""

    def __init__(self, model, opt, dev, cfg: TrainConfig, objective=None):
        self.model, self.opt, self.dev = model, opt, dev
        self.micro, self.augment, self.jitter, self.seed = cfg.micro, cfg.augmented, cfg.colour_jitter, cfg.seed
        self.objective = objective or MSE()

    def __call__(self, tok, y, m, epoch, index) -> float:
        from train.finetune import colour_jitter, dihedral

        rng = np.random.default_rng([self.seed, epoch, index])  # the same draws after a resume
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        count = max(float(m.sum()) * self.objective.n_genes(y), 1.0)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(0, len(tok), self.micro):
            x = to_input(tok[a : a + self.micro], self.dev)
            yy = torch.from_numpy(y[a : a + self.micro]).to(self.dev, non_blocking=True)
            mm = torch.from_numpy(m[a : a + self.micro]).to(self.dev, non_blocking=True)
            if self.augment:
                x, yy, mm = dihedral(x, yy, mm, int(rng.integers(4)), bool(rng.integers(2)))
            if self.jitter:
                x = colour_jitter(x, self.jitter, gen)
            with autocast(self.dev):
                pred = self.model(x)
            loss = self.objective.loss(pred.float(), yy, mm) / count
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        return total


def validate(model, batches: Batches, dev, objective=None) -> tuple[float | None, float | None]:
    """The loss (masked MSE by default) and mean per-gene Pearson in target space of the validation split (None
    when it is empty)."""
    if batches.n == 0:
        return None, None
    objective = objective or MSE()
    model.eval()
    preds, ys, ms = [], [], []
    with torch.inference_mode(), autocast(dev):
        for tok, y, m, _ in batches.epoch(shuffle=False):
            preds.append(model(to_input(tok, dev)).float().cpu().numpy())
            ys.append(y)
            ms.append(m)
    p, y, m = np.concatenate(preds), np.concatenate(ys), np.concatenate(ms)
    loss = objective.val_loss(p, y, m)
    r = per_gene_pearson(*objective.scored(p, y), m)
    return loss, float(np.nanmean(r)) if np.isfinite(r).any() else None


def predict(model, inputs: FoldInputs, sample: str, idx: np.ndarray, transform, dev, objective=None, raw=False):
    """Predictions and transformed truth (target space) and in-tissue mask of the given patches of one sample;
    ``raw``: the model's own output too (a count model's log-rates), fourth."""
    arr = inputs.arrays[sample]
    model.eval()
    preds = []
    with torch.inference_mode(), autocast(dev):
        for a in range(0, len(idx), 16):
            tok = read_tokens(arr, sample, idx[a : a + 16])
            preds.append(model(to_input(tok, dev)).float().cpu().numpy())
    counts, library, mask = load_targets(arr, idx)
    out = np.concatenate(preds)
    pred = (objective or MSE()).predicted(out, library)
    return (pred, transform(counts, library), mask.astype(bool)) + ((out,) if raw else ())


@dataclass
class Best:
    """The epoch with the best validation pcc_gene so far, and its weights."""

    epoch: int = -1
    score: float = -np.inf
    state: dict | None = None

    def offer(self, epoch: int, score: float | None, model, always: bool) -> bool:
        s = score if score is not None and np.isfinite(score) else -np.inf
        if self.state is None or s > self.score or always:
            self.epoch, self.score = epoch, s
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        return False

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "score": float(self.score), "state": self.state}

    @classmethod
    def from_state(cls, st: dict | None) -> Best:
        return cls() if st is None else cls(int(st["epoch"]), float(st["score"]), st["state"])


class Checkpointer:
    """Saves the training state so that a kill loses little and saving costs at most ~10 % of the time.

    The state (model, optimizer, RNG, log, best epoch) is written after the first and the last epoch,
    and after any epoch once the training time since the last save reaches 10 × what that save took.
    The best weights go to ``best-<epoch>.pt``, which the state names, so the two always agree; a
    resumed run replays the epochs since the last save and ends exactly where an uninterrupted one does.
    """

    def __init__(self, run: RunDir, main: bool):
        self.run, self.main = run, main
        self.cost = None  # seconds the last save took
        self.since = 0.0  # training seconds since then
        self.saved_best = -1

    def after_epoch(self, epoch: int, seconds: float, model, opt, log: list, best: Best, last: bool) -> None:
        self.since += seconds
        if not self.main or not (last or self.cost is None or self.since >= 10 * self.cost):
            return
        t = time.perf_counter()
        if best.state is not None and best.epoch != self.saved_best:
            self.run.save_best(best.epoch, best.to_state())
        self.run.save_state(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_epoch": best.epoch,
                "log": json.dumps(log),
                "torch_rng": torch.get_rng_state(),
            }
        )
        self.run.drop_bests(keep=best.epoch)
        self.saved_best, self.cost, self.since = best.epoch, time.perf_counter() - t, 0.0


def resume(model, opt, run: RunDir, ddp: Distributed) -> tuple[int, Best, list[dict]]:
    """(first epoch to run, best so far, log so far) from the run folder's saved state, if any."""
    saved = run.load_state()
    if saved is None:
        return 0, Best(), []
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    log = json.loads(saved["log"])
    if ddp.main:  # the saved state is the truth: log lines of epochs after it are replayed
        run.rewrite_log(log)
    best_epoch = int(saved["best_epoch"])
    return int(saved["epoch"]) + 1, Best.from_state(run.load_best(best_epoch) if best_epoch >= 0 else None), log


def fit(
    model,
    opt,
    step: Stepper,
    cfg: TrainConfig,
    run: RunDir,
    ddp: Distributed,
    train_b: Batches,
    val_b: Batches,
    dev,
    targets_for=None,
    show_progress: bool = True,
    tensorboard: bool = False,
) -> Best:
    """Train for cfg.epochs, resuming from the run folder's state; returns the best validation epoch.

    ``tensorboard``: each epoch's log row also goes to TensorBoard event files in the run folder."""
    start, best, log = resume(model, opt, run, ddp)
    events = TensorBoard(run) if tensorboard and ddp.main else None
    saver = Checkpointer(run, ddp.main)
    n_batches = -(-train_b.n // cfg.batch_size)
    usable = n_batches // ddp.world * ddp.world  # every rank takes the same number of steps
    with progress(disable=not (show_progress and ddp.main)) as bar:
        task = bar.add_task(f"{cfg.encoder}/{cfg.run_name}/fold-{cfg.fold}", total=cfg.epochs, completed=start, rate="")
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            losses = []
            for i, (tok, y, m, keys) in enumerate(train_b.epoch(shuffle=True, seed=cfg.seed * 100003 + epoch)):
                if i >= usable or i % ddp.world != ddp.rank:
                    continue
                if targets_for is not None:
                    y, m = targets_for(keys)
                losses.append(step(tok, y, m, epoch, i))
            val_loss, val_pcc = validate(model, val_b, dev, step.objective)
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)) if losses else None,
                "val_loss": val_loss,
                "val_pcc_gene": val_pcc,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.append(row)
            best.offer(epoch, val_pcc, model, always=val_b.n == 0)
            saver.after_epoch(epoch, time.perf_counter() - t0, model, opt, log, best, last=epoch == cfg.epochs - 1)
            if ddp.main:
                run.append_log(row)
            if events is not None:
                events.epoch(row)
            shown = f"{val_pcc:.3f}" if val_pcc is not None else "—"
            bar.update(task, advance=1, rate=f"loss {row['train_loss'] or float('nan'):.3f} val pcc {shown}")
    if events is not None:
        events.close()
    return best
