"""The workspace: where every artefact lives (docs/design.md §7), and the names that may appear in its paths.

The root is ``--workspace``, else ``$FEATCACHE_WORKSPACE``, else ``./featcache-data``::

    datasets/<dataset>/                         Dataset     (featcache/stores/dataset.py)
    features/<dataset>/<encoder>[-random[-s<seed>]].zarr  FeatureStore (featcache/stores/features.py); or,
                                                with --features-root / $FEATCACHE_FEATURES_ROOT, under that
                                                path or fsspec URL (s3://, gs://, a shared file system)
    runs/<dataset>/<encoder>/<run>/fold-<fold>[-seed<seed>]  RunDir (featcache/stores/runs.py)
    results/<dataset>/                          Results     (featcache/stores/results.py)
    predictions/<run>/<slide>/                  PredictionDir (featcache/stores/predictions.py)
    raw/, weights/                              the demo's synthetic input and stand-in weights

Every name that becomes part of a path (dataset, sample, patient, encoder, run variant, fold) is
checked here, so no command or API call can read or write outside the workspace.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.stores.dataset import Dataset
from featcache.stores.features import FeatureStore, split_store_name, store_name
from featcache.stores.location import Location, is_url, local_path
from featcache.stores.predictions import PredictionDir
from featcache.stores.results import Results
from featcache.stores.runs import FOLD_PREFIX, RunDir, fold_folder

ENV_VAR = "FEATCACHE_WORKSPACE"
FEATURES_ENV_VAR = "FEATCACHE_FEATURES_ROOT"
DEFAULT = "featcache-data"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def _features_root(root: str | os.PathLike | None) -> str | None:
    """A features root as stored: a URL without its trailing '/', or an absolute local folder."""
    if root is None or str(root).strip() == "":
        return None
    if is_url(root):
        return str(root).rstrip("/")
    path = local_path(root).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FeatcacheError(f"--features-root {root} is a file, not a folder; name a folder or a URL (s3://...).")
    return str(path)


def check_name(name, what: str) -> str:
    """``name`` if it is safe as one path component; else one clear error."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.endswith(".json") or ".." in name:
        raise FeatcacheError(
            f"{what} {name!r} is not a valid name: use letters, digits, '-', '_', '.', '+' "
            "(starting with a letter or digit; no '/', no '..', not ending in .json)."
        )
    return name


@dataclass(frozen=True)
class Workspace:
    """The folder that holds datasets, feature stores, runs, results and predictions.

    Every path inside it is built here (and by the artefact classes it returns), never by hand.

    Examples
    --------
    >>> ws = Workspace.resolve("featcache-data")
    >>> ds = ws.open_dataset("demo")
    >>> store = ws.feature_store("demo", "uni2h")
    """

    root: Path
    features_root: str | None = None  # where feature stores live (a path or fsspec URL); None: <root>/features

    @classmethod
    def resolve(cls, workspace: str | os.PathLike | None = None, features_root: str | None = None) -> Workspace:
        """The workspace to use.

        Parameters
        ----------
        workspace : str, path, Workspace or None
            A folder (need not exist yet); None means ``$FEATCACHE_WORKSPACE``, else ``./featcache-data``.
        features_root : str or None
            Where the feature stores live, ``<features_root>/<dataset>/<store>.zarr``: a folder or an
            fsspec URL (``s3://bucket/prefix``); None means ``$FEATCACHE_FEATURES_ROOT``, else the
            workspace's ``features/`` (or, for a Workspace, the one it has).

        Returns
        -------
        Workspace
        """
        if isinstance(workspace, Workspace):
            return workspace if features_root is None else cls(workspace.root, _features_root(features_root))
        root = Path(workspace or os.environ.get(ENV_VAR) or DEFAULT).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise FeatcacheError(f"workspace {root} is a file, not a folder; pass --workspace DIR.")
        return cls(root, _features_root(features_root or os.environ.get(FEATURES_ENV_VAR) or None))

    # ------------------------------------------------------------------ datasets
    def dataset(self, name: str) -> Dataset:
        return Dataset(self.root / "datasets" / check_name(name, "dataset"))

    def open_dataset(self, name: str) -> Dataset:
        """A prepared dataset.

        Parameters
        ----------
        name : str
            The dataset's name (``featcache prepare --dataset NAME``).

        Returns
        -------
        Dataset

        Raises
        ------
        FeatcacheError
            When it does not exist (naming the datasets that do) or its dataset.json is damaged.
        """
        ds = self.dataset(name)
        if not ds.exists():
            known = [d.name for d in self.datasets()]
            raise FeatcacheError(
                f"no prepared dataset {name!r} in workspace {self.root}"
                + (f" (it has: {', '.join(known)})" if known else "")
                + ". Make it with `featcache prepare --dataset NAME --sample NAME=DIR ...`."
            )
        _ = ds.meta  # a damaged dataset.json is reported as such
        return ds

    def datasets(self) -> list[Dataset]:
        """Every prepared dataset of the workspace."""
        base = self.root / "datasets"
        found = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
        return [Dataset(p) for p in found if (p / "dataset.json").is_file()]

    # ------------------------------------------------------------------ feature stores
    def feature_store(self, dataset: str, encoder: str, random: bool = False, seed: int = 0) -> FeatureStore:
        """The feature store of an encoder over a dataset (it may not exist yet: see ``exists``).

        Parameters
        ----------
        dataset, encoder : str
            Names as in ``featcache extract --dataset D --encoder E``.
        random : bool
            The random-init store instead of the pretrained one.
        seed : int
            The random-init store's seed: ``<encoder>-random`` holds ``random:0``, ``<encoder>-random-s<seed>``
            the other seeds (docs/design.md §7).

        Returns
        -------
        FeatureStore
        """
        check_name(dataset, "dataset")
        name = check_name(store_name(check_name(encoder, "encoder"), random, seed), "feature store")
        return FeatureStore(
            f"{self.features_dir(dataset)}/{name}.zarr",
            dataset=dataset,
            encoder=encoder,
            random=random,
            seed=seed,
        )

    def features_dir(self, dataset: str | None = None) -> str:
        """Where the feature stores (of one dataset) live: a local folder or an fsspec URL."""
        base = self.features_root or str(self.root / "features")
        return f"{base}/{check_name(dataset, 'dataset')}" if dataset else base

    def feature_stores(self, dataset: str | None = None) -> list[FeatureStore]:
        """Every feature store with an identity (complete or not), of one dataset or of all."""
        base = Location(self.features_dir())
        folders = (
            [check_name(dataset, "dataset")] if dataset else sorted(n for n in base.listdir() if NAME.fullmatch(n))
        )
        stores = [
            self.feature_store(f, *split_store_name(n.removesuffix(".zarr")))
            for f in folders
            for n in sorted(base.listdir(f))
            if n.endswith(".zarr") and NAME.fullmatch(n.removesuffix(".zarr"))
        ]
        return [s for s in stores if s.has_identity()]

    def check_output(self, location: str) -> None:
        """Refuse a store location inside the workspace's datasets, runs or results, or above them."""
        if is_url(location):
            return
        target = local_path(location).expanduser().absolute().resolve()
        for sub in ("datasets", "runs", "results"):
            guarded = (self.root / sub).resolve()
            if target == guarded or guarded in target.parents or target in guarded.parents:
                raise FeatcacheError(
                    f"--output {location} is inside (or holds) the workspace's {sub}/ folder, which "
                    "feature stores must not touch; choose a folder of its own."
                )

    # ------------------------------------------------------------------ runs and results
    def run(self, dataset: str, encoder: str, run: str, fold: str, seed: int = 0, lr: float | None = None) -> RunDir:
        """One run folder, ``runs/<dataset>/<encoder>/<run>/fold-<fold>[-seed<seed>][-lr<lr>]/`` (it may not exist
        yet): seed 0 has no suffix, every other seed is its own folder beside it, as is each trial of an lr grid.

        Parameters
        ----------
        dataset, encoder : str
        run : str
            The run's name: the mode, then its variant suffixes (e.g. ``frozen``, ``random-counts-allbins``).
        fold : str
            The test patient.
        seed : int
            The training seed.
        lr : float, optional
            The learning rate of one trial of an lr grid.

        Returns
        -------
        RunDir
        """
        parts = [check_name(dataset, "dataset"), check_name(encoder, "encoder"), check_name(run, "run name")]
        return RunDir(self.root / "runs" / Path(*parts) / fold_folder(check_name(fold, "fold"), seed, lr))

    def runs_dir(self, dataset: str) -> Path:
        return self.root / "runs" / check_name(dataset, "dataset")

    def runs(self, dataset: str) -> list[RunDir]:
        """Every run folder of a dataset that has a config.json (finished or not)."""
        base = self.runs_dir(dataset)
        return [RunDir(p.parent) for p in sorted(base.glob(f"*/*/{FOLD_PREFIX}*/config.json"))] if base.is_dir() else []

    def results(self, dataset: str) -> Results:
        """The dataset's results folder (comparison file, paired statistics, figures)."""
        return Results(self.root / "results" / check_name(dataset, "dataset"))

    def prediction_dir(self, run_label: str, slide: str) -> PredictionDir:
        return PredictionDir(self.root / "predictions" / check_name(run_label, "run") / check_name(slide, "slide"))

    # ------------------------------------------------------------------ demo inputs
    def raw_dir(self, name: str) -> Path:
        return self.root / "raw" / check_name(name, "raw input")

    def weights_file(self, name: str) -> Path:
        return self.root / "weights" / check_name(name, "weights file")
