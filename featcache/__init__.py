"""featcache: benchmark image encoders for predicting Visium HD expression from H&E.

Stage 1 (this package): read Space Ranger outputs, cut bin-aligned patches, cache encoder
token grids in Zarr stores. Stage 2 lives in :mod:`train`, stage 3 in :mod:`analysis`.
"""

__version__ = "0.1.0"

from featcache.errors import FeatcacheError  # noqa: E402

__all__ = ["FeatcacheError", "__version__"]
