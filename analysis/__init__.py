"""Stage 3: open features, predictions and metrics as xarray objects; draw comparison figures."""

from analysis.api import open_features, open_patches, open_results, open_run, open_targets, stitch, stitch_image

__all__ = ["open_features", "open_patches", "open_results", "open_run", "open_targets", "stitch", "stitch_image"]
