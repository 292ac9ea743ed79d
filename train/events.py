"""TensorBoard event files of a run's epochs (``--tensorboard``), for users who read their curves there.

The same numbers as ``log.jsonl``: one scalar per logged value and epoch, in the run folder's
``tensorboard/`` (``tensorboard --logdir runs/<dataset>`` shows every run and fold side by side).
"""

from __future__ import annotations

from featcache.errors import FeatcacheError
from featcache.stores import RunDir


class TensorBoard:
    """The log rows as TensorBoard scalars (train/loss, val/loss, val/pcc_gene) in the run folder's events folder."""

    def __init__(self, run: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FeatcacheError(
                "--tensorboard needs the tensorboard package: pip install 'featcache[tensorboard]' "
                "(or leave --tensorboard out; log.jsonl has the same numbers)."
            ) from None
        self.writer = SummaryWriter(log_dir=str(run.tensorboard_dir))

    def epoch(self, row: dict) -> None:
        for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/pcc_gene", "val_pcc_gene")):
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
