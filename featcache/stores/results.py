"""Results of a dataset: ``results/<dataset>/`` (docs/design.md §7). This file is its format.

::

    encoder_loocv_comparison.json   every run's summary over folds, in the reference study's schema
    paired_comparison.json          paired statistics between runs (``analysis compare``)
    figures/                        the comparison figures and spatial rows (PNG and PDF), training curves (PNG)
    report/index.html               the whole benchmark on one self-contained page (``analysis report``)
"""

from __future__ import annotations

import json
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.stores.files import read_json, write_json

COMPARISON = "encoder_loocv_comparison.json"
PAIRED = "paired_comparison.json"


class Results:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.dataset = self.path.name

    @property
    def comparison_path(self) -> Path:
        return self.path / COMPARISON

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    def training_curves_path(self, run: str) -> Path:
        """``figures/training_curves_<run>.png``: training loss and validation pcc_gene per epoch of every fold."""
        return self.figures_dir / f"training_curves_{run}.png"

    @property
    def report_path(self) -> Path:
        """``report/index.html``: the page ``analysis report`` writes (figures inline, opened offline)."""
        return self.path / "report" / "index.html"

    def read_paired(self) -> dict | None:
        return read_json(self.paired_path)

    def read_comparison(self, required: bool = False) -> dict | None:
        res = read_json(self.comparison_path)
        if res is None and required:
            raise FeatcacheError(
                f"no results file {self.comparison_path}; make it with `train loocv` or "
                f"`train summarize --dataset {self.dataset}`."
            )
        return res

    def write_comparison(self, comparison: dict) -> Path:
        """Strict JSON only (no NaN or Infinity tokens): a non-finite value is refused before anything is written."""
        try:
            json.dumps(comparison, allow_nan=False)
        except ValueError:
            raise FeatcacheError("the comparison holds a non-finite number; it is not written.") from None
        write_json(self.comparison_path, comparison)
        return self.comparison_path

    @property
    def paired_path(self) -> Path:
        return self.path / PAIRED

    def write_paired(self, paired: dict) -> Path:
        write_json(self.paired_path, {k: v for k, v in paired.items() if not k.startswith("_")})
        return self.paired_path
