#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a GPU image that has torch, timm, xarray, pandas, pyarrow and
# friends but not Zarr, numcodecs or Dask: downloaded into .whl/ (git-ignored) for Python 3.12,
# x86-64, at the versions this checkout's environment uses. Run it where pip reaches PyPI.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
version() { "$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
for pkg in zarr numcodecs dask partd locket donfig google-crc32c imagecodecs py-spy; do
    v=$(version "$pkg")
    spec=$pkg${v:+==$v}
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec" \
        || "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$spec"
done
du -sh .whl
