"""Where featcache keeps its stores (DESIGN §7).

The workspace root is ``--workspace``, else ``$FEATCACHE_WORKSPACE``, else ``./featcache-data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FEATCACHE_WORKSPACE"
DEFAULT = "featcache-data"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, workspace: str | os.PathLike | None = None) -> "Workspace":
        root = workspace or os.environ.get(ENV_VAR) or DEFAULT
        return cls(Path(root).expanduser().absolute())

    def dataset_dir(self, dataset: str) -> Path:
        return self.root / "datasets" / dataset

    def patches_store(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "patches.zarr"

    def targets_store(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "targets.zarr"

    def dataset_json(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "dataset.json"

    def features_store(self, dataset: str, encoder: str) -> Path:
        return self.root / "features" / dataset / f"{encoder}.zarr"

    def run_dir(self, dataset: str, encoder: str, mode: str, fold: str) -> Path:
        return self.root / "runs" / dataset / encoder / mode / f"fold-{fold}"

    def results_dir(self, dataset: str) -> Path:
        return self.root / "results" / dataset
