"""The QC picture of prepare: patch outlines sit where the patches were cut, on rotated, flipped and projective grids.

Where a patch's corner is comes from the sample's own positions file (the synthetic slide's true
bin centres), not from the registration prepare fitted: the outer corner of the patch's corner bin
is its centre moved half a bin away from its inner neighbours along both lattice axes.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import BIN8
from PIL import Image

from featcache.prepare import prepare_dataset
from featcache.stores import Workspace
from featcache.synth import SynthConfig, synthesize

TINY = SynthConfig(rows=48, cols=64, n_genes=64, seed=11)


def true_corners(positions: pd.DataFrame, r0: int, c0: int, bins: int = 32) -> list[tuple[float, float]]:
    """Full-resolution (row, col) of the patch's four outer corners, from the bins' recorded centres."""
    at = positions.set_index(["array_row", "array_col"])[["pxl_row_in_fullres", "pxl_col_in_fullres"]]
    p = lambda r, c: at.loc[(r, c)].to_numpy(float)  # noqa: E731
    out = []
    for r, c, dr, dc in ((r0, c0, 1, 1), (r0, c0 + bins - 1, 1, -1), (r0 + bins - 1, c0 + bins - 1, -1, -1)):
        centre = p(r, c)  # half a bin away from the next bin inside the patch, along each axis
        out.append(tuple(centre - 0.5 * (p(r + dr, c) - centre) - 0.5 * (p(r, c + dc) - centre)))
    return out


def on_outline(picture: np.ndarray, outline, scale: float, point, radius: int = 1) -> bool:
    """A marker of ``radius`` thumbnail px at full-resolution ``point`` touches an outline pixel."""
    y, x = ((np.asarray(point) + 0.5) * scale - 0.5).round().astype(int)
    window = picture[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1]
    return bool((window == outline).all(axis=-1).any())


def check_sample(ws, dataset: str, sample: str, source) -> int:
    meta = json.loads((ws / "datasets" / dataset / "dataset.json").read_text())["samples"][sample]
    picture = np.asarray(Image.open(ws / "datasets" / dataset / "qc" / f"{sample}.png").convert("RGB"))
    assert picture.std() > 10  # a slide, not an empty canvas
    scale, outline = meta["qc"]["scale"], np.array(meta["qc"]["outline"], np.uint8)
    positions = pd.read_parquet(source / BIN8 / "spatial" / "tissue_positions.parquet")
    origins = Workspace.resolve(ws).open_dataset(dataset).origins(sample)
    assert len(origins) >= 2
    for r0, c0 in origins:
        corners = true_corners(positions, int(r0), int(c0))
        for corner in corners:
            assert on_outline(picture, outline, scale, corner), (sample, r0, c0, corner)
        # and not everywhere: the patch's middle, 16 bins from every edge, carries no outline
        middle = np.mean([corners[0], corners[2]], axis=0)
        assert not on_outline(picture, outline, scale, middle, radius=2), (sample, r0, c0)
    return len(origins)


def test_outlines_sit_on_the_patches_of_a_rotated_flipped_sample(prepared, synth_dir):
    ws, res = prepared
    assert res.qc["P2"] == ws / "datasets" / "tiny" / "qc" / "P2.png" and res.qc["P2"].is_file()
    meta = json.loads((ws / "datasets" / "tiny" / "dataset.json").read_text())["samples"]["P2"]
    assert meta["registration"]["flipped"] and abs(meta["registration"]["rotation_deg"]) > 1
    assert check_sample(ws, "tiny", "P2", synth_dir / "P2") >= 2


def test_outlines_sit_on_the_patches_of_a_projective_sample(tmp_path):
    synthesize(tmp_path, ["Q"], SynthConfig(**{**TINY.__dict__, "perspective": 0.08, "rotation_deg": 1.1}))
    ws = tmp_path / "ws"
    prepare_dataset("proj", {"S": str(tmp_path / "Q")}, workspace=ws, show_progress=False, min_tissue=0.3)
    reg = json.loads((ws / "datasets" / "proj" / "dataset.json").read_text())["samples"]["S"]["registration"]
    assert reg["global_affine_residual_bins"] > 0.3  # projective: an affine map would miss by a third of a bin
    check_sample(ws, "proj", "S", tmp_path / "Q")


@pytest.mark.parametrize("wrong", ["shifted", "scaled"])
def test_a_wrong_registration_misses_the_outlines(prepared, synth_dir, wrong):
    """The check above can fail: corners of a grid two bins off or with a 5 % wrong pitch miss the outlines."""
    ws, _ = prepared
    meta = json.loads((ws / "datasets" / "tiny" / "dataset.json").read_text())["samples"]["P1"]
    picture = np.asarray(Image.open(ws / "datasets" / "tiny" / "qc" / "P1.png").convert("RGB"))
    positions = pd.read_parquet(synth_dir / "P1" / BIN8 / "spatial" / "tissue_positions.parquet")
    if wrong == "shifted":
        positions["pxl_row_in_fullres"] += 60.0  # about two bins
    else:
        positions[["pxl_row_in_fullres", "pxl_col_in_fullres"]] *= 1.05
    origins = Workspace.resolve(ws).open_dataset("tiny").origins("P1")
    outline = np.array(meta["qc"]["outline"], np.uint8)
    found = [
        all(on_outline(picture, outline, meta["qc"]["scale"], k) for k in true_corners(positions, int(r0), int(c0)))
        for r0, c0 in origins
    ]
    assert sum(found) < len(found) / 2, found
