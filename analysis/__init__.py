"""Stage 3: open features, predictions and metrics as xarray objects; draw comparison figures."""
