"""The store layer: one class per artefact on disk, each the only code that knows its paths and files.

=================  ============================================  ==============================
artefact           where                                         class (file)
=================  ============================================  ==============================
workspace          ``--workspace`` / ``$FEATCACHE_WORKSPACE``     :class:`Workspace` (workspace.py)
prepared dataset   ``datasets/<dataset>/``                       :class:`Dataset` (dataset.py)
feature store      ``features/<dataset>/<encoder>[-random].zarr``  :class:`FeatureStore` (features.py)
run folder         ``runs/<dataset>/<encoder>/<run>/fold-<f>/``  :class:`RunDir` (runs.py)
results            ``results/<dataset>/``                        :class:`Results` (results.py)
=================  ============================================  ==============================
"""

from featcache.stores.dataset import Dataset
from featcache.stores.features import FeatureStore
from featcache.stores.results import Results
from featcache.stores.runs import RunDir
from featcache.stores.workspace import Workspace, check_name

__all__ = ["Dataset", "FeatureStore", "Results", "RunDir", "Workspace", "check_name"]
