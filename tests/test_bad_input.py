"""Bad input, as a catalogue: every case ends in one clear message, a non-zero exit, no traceback,
and a workspace whose files are byte for byte what they were.

Grouped by what the user got wrong: the Space Ranger folder, the image, the options and names,
the workspace, the stores (missing, corrupt or foreign chunks), and run folders from elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import BIN8, clone_sample
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import featcache_app, train_app


# --------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (a missing root is an empty workspace)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(result, *needles, code: int = 2) -> str:
    """One `error:` line holding every needle, the exit code, no traceback; returns the message."""
    assert result.exit_code == code, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def invoke(app, ws: Path, *args):
    before = snapshot(ws)
    result = CliRunner().invoke(app, [*args, "--workspace", str(ws)])
    return result, before


def check(app, ws: Path, args, *needles) -> str:
    """Run a command that must be refused and leave the workspace exactly as it was."""
    result, before = invoke(app, ws, *args)
    message = refused(result, *needles)
    assert snapshot(ws) == before, "the workspace changed"
    return message


def prepare_args(*args):
    return ["prepare", "--dataset", "bad", *args]


@pytest.fixture
def p1(synth_dir, tmp_path):
    return clone_sample(synth_dir / "P1", tmp_path / "P1")


@pytest.fixture
def ws(tmp_path):
    return tmp_path / "ws"


@pytest.fixture
def full_ws(tiny_cnn_features, tmp_path):
    """A copy of a workspace with the 'tiny' dataset and tiny-cnn random-init features."""
    src, _ = tiny_cnn_features
    dst = tmp_path / "full"
    for sub in ("datasets", "features"):
        shutil.copytree(src / sub, dst / sub)
    return dst


def spatial(sample: Path) -> Path:
    return sample / BIN8 / "spatial"


def sample_image(sample: Path) -> np.ndarray:
    return tifffile.imread(sample / f"{sample.name}_tissue_image.btf")


# --------------------------------------------------------------------------- the Space Ranger folder
def test_missing_sample_folder(ws, tmp_path):
    check(featcache_app, ws, prepare_args("--sample", f"P1={tmp_path / 'nope'}"), "not found")


def test_folder_that_is_not_a_space_ranger_output(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    check(featcache_app, ws, prepare_args("--sample", f"P1={tmp_path / 'empty'}"), "not a Space Ranger")


def test_missing_matrix(p1, ws):
    (p1 / BIN8 / "filtered_feature_bc_matrix.h5").unlink()
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "filtered_feature_bc_matrix.h5")


def test_truncated_matrix(p1, ws):
    path = p1 / BIN8 / "filtered_feature_bc_matrix.h5"
    path.write_bytes(path.read_bytes()[:2000])
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "HDF5")


def test_missing_scalefactors(p1, ws):
    (spatial(p1) / "scalefactors_json.json").unlink()
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "scalefactors_json.json")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x89\xff\x00binary", "not valid JSON"),
        (b"null", "holds NoneType"),
        (b'{"microns_per_pixel": "0.27"}', "not a positive number"),
        (b'{"microns_per_pixel": 0.27, "bin_size_um": true}', "not a positive number"),
    ],
)
def test_damaged_scalefactors(p1, ws, content, needle):
    (spatial(p1) / "scalefactors_json.json").write_bytes(content)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), needle)


def test_positions_with_wrong_columns(p1, ws):
    path = spatial(p1) / "tissue_positions.parquet"
    pd.read_parquet(path).rename(columns={"array_col": "col"}).to_parquet(path)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "array_col")


@pytest.mark.parametrize(
    "kind", ["corrupt parquet", "empty parquet", "zero-row parquet", "corrupt csv", "empty csv", "zero-row csv"]
)
def test_damaged_positions_table(p1, ws, kind):
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    if "csv" in kind:
        path.unlink()
        path = path.with_suffix(".csv")
    if kind.startswith("corrupt"):
        path.write_bytes(os.urandom(3000) if "parquet" in kind else b"\x00\xff" * 500 + b"\n,,\n\x01")
    elif kind.startswith("empty"):
        path.write_bytes(b"")
    elif "parquet" in kind:
        pos.iloc[:0].to_parquet(path)
    else:
        pos.iloc[:0].to_csv(path, index=False)
    message = check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "tissue_positions")
    assert any(w in message for w in ("damaged", "empty", "no bins", "lacks column", "not numeric")), message


def test_non_finite_bin_position(p1, ws):
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    pos.loc[500, "pxl_col_in_fullres"] = np.nan
    pos.to_parquet(path)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "non-finite position")


def test_matrix_barcodes_absent_from_positions(p1, ws):
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    pos.drop(pos.index[pos.in_tissue == 1][:5]).to_parquet(path)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "5 barcode(s)", "not in")


def test_bins_that_no_local_projective_map_follows(p1, ws):
    """One bin inside a kept patch moved by 1.4 bins: neither the sample-wide nor the patch's own homography fits."""
    path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(path)
    k = pos.index[(pos.array_row == 45) & (pos.array_col == 50)][0]
    pos.loc[k, "pxl_row_in_fullres"] += 40.0
    pos.to_parquet(path)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "patch at array (32, 32)", "no projective map")


def test_inconsistent_microns_per_pixel(p1, ws):
    path = spatial(p1) / "scalefactors_json.json"
    sf = json.loads(path.read_text())
    sf["microns_per_pixel"] = 0.5
    path.write_text(json.dumps(sf))
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "inconsistent µm/px")


def test_one_folder_under_two_sample_names(p1, ws, tmp_path):
    copy = shutil.copytree(p1, tmp_path / "copy", symlinks=True)
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--sample", f"P9={p1}"), "same Space Ranger output")
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--sample", f"P9={copy}"), "same Space Ranger output")


def test_duplicate_sample_name(p1, ws):
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--sample", f"P1={p1}"), "twice")


def test_min_tissue_that_keeps_no_patch(p1, ws):
    pos = pd.read_parquet(spatial(p1) / "tissue_positions.parquet")
    pos.loc[pos.array_row % 2 == 0, "in_tissue"] = 0  # at most half of any window is in tissue
    pos.to_parquet(spatial(p1) / "tissue_positions.parquet")
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--min-tissue", "0.9"), "lower --min-tissue")


# --------------------------------------------------------------------------- the image
def test_missing_image(p1, ws):
    (p1 / "P1_tissue_image.btf").unlink()
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}"), "--image")


def test_downscaled_image(p1, ws):
    hires = spatial(p1) / "tissue_hires_image.png"
    check(
        featcache_app,
        ws,
        prepare_args("--sample", f"P1={p1}", "--image", f"P1={hires}"),
        "downscaled",
        "full-resolution microscope image",
    )


def test_image_too_coarse_for_14_px_per_bin(p1, ws, tmp_path):
    """A scan at ~0.8 µm/px (10 px per 8 µm bin): rendering 14 px per bin would upsample it; refused."""
    k = 0.35
    pos_path = spatial(p1) / "tissue_positions.parquet"
    pos = pd.read_parquet(pos_path)
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] *= k
    pos.to_parquet(pos_path)
    sf_path = spatial(p1) / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    sf.update(microns_per_pixel=sf["microns_per_pixel"] / k, spot_diameter_fullres=sf["spot_diameter_fullres"] * k)
    sf_path.write_text(json.dumps(sf))
    img = sample_image(p1)
    small = np.asarray(Image.fromarray(img).resize((int(img.shape[1] * k), int(img.shape[0] * k))))
    path = tmp_path / "coarse.tif"
    tifffile.imwrite(path, small, photometric="rgb")
    check(
        featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--image", f"P1={path}"), "upsample", "px per 8 µm bin"
    )


def test_truncated_tiff(p1, ws, tmp_path):
    img = sample_image(p1)
    path = tmp_path / "truncated.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--image", f"P1={path}"), str(path))


def test_compression_that_cannot_be_decoded(p1, ws, tmp_path):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, sample_image(p1), photometric="rgb", tile=(256, 256))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(34892)  # a compression nothing here decodes
    message = check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--image", f"P1={path}"), str(path))
    assert "compression" in message or "decode" in message or "cannot read" in message


def test_float_image_out_of_range(p1, ws, tmp_path):
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, sample_image(p1).astype(np.float32) * 300, photometric="rgb", tile=(256, 256))
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--image", f"P1={path}"), "8-bit RGB")


def test_single_channel_image(p1, ws, tmp_path):
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, sample_image(p1)[..., 0], tile=(256, 256))
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--image", f"P1={path}"), "single-channel")


# --------------------------------------------------------------------------- options and names
def test_unknown_gene_in_gene_list(p1, ws, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("EPCAM\nDES\nNOT_A_GENE\n")
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--genes", str(genes)), "NOT_A_GENE")


def test_gene_list_that_is_not_utf8(p1, ws, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_bytes("EPCAM\nDES\n".encode("utf-16"))
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", "--genes", str(genes)), "not UTF-8")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "-1"], "--workers"),
        (["--stride", "0"], "--stride"),
        (["--min-tissue", "1.5"], "--min-tissue"),
        (["--patient", "P9=A"], "not a --sample name"),
        (["--patient", "P1=A", "--patient", "P1=B"], "twice"),
    ],
)
def test_bad_prepare_options(p1, ws, args, needle):
    check(featcache_app, ws, prepare_args("--sample", f"P1={p1}", *args), needle)


@pytest.mark.parametrize("name", ["zarr.json", "../../x", ".hidden", "a/b"])
def test_names_that_would_escape_or_break_a_store(p1, ws, name):
    check(featcache_app, ws, ["prepare", "--dataset", name, "--sample", f"P1={p1}"], "not a valid name")
    check(featcache_app, ws, prepare_args("--sample", f"{name}={p1}"), "not a valid name")


def test_manifest_naming_a_missing_folder_or_a_sample_twice(p1, ws, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample,patient,path\nP1,A,{p1}\nP2,A,missing_folder\n")
    check(featcache_app, ws, prepare_args("--manifest", str(manifest)), "missing_folder")
    manifest.write_text(f"sample,patient,path\nP1,A,{p1}\nP1,B,{p1}\n")
    check(featcache_app, ws, prepare_args("--manifest", str(manifest)), "appears twice")
    manifest.write_text("name,folder\nP1,x\n")
    check(featcache_app, ws, prepare_args("--manifest", str(manifest)), "sample,patient,path")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "../../x"], "not a valid name"),
        (["--chunk-patches", "-1"], "--chunk-patches"),
        (["--batch-size", "0"], "--batch-size"),
        (["--weights", "random:-1"], "random:SEED"),
        (["--output", "gs://bucket/x.zarr"], "gcsfs"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--shard", "2/2"], "0 <= K < N"),
    ],
)
def test_bad_extract_options(full_ws, args, needle):
    base = ["extract", "--encoder", "tiny-cnn", "--weights", "random:5", "--dataset", "tiny"]
    check(featcache_app, full_ws, [*base, *args], needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--encoder", "../../x"], "not a valid name"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--in-memory", "maybe"], "--in-memory"),
        (["--fold", "P9"], "not a patient"),
        (["--dataset", "nope"], "no prepared dataset"),
    ],
)
def test_bad_training_options(full_ws, args, needle):
    base = {
        "--fold": "P1",
        "--encoder": "tiny-cnn",
        "--mode": "random",
        "--dataset": "tiny",
        "--epochs": "1",
        "--val-fraction": "0",
    }
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    check(train_app, full_ws, ["decoder", *[x for kv in base.items() for x in kv]], needle)


def test_weights_file_named_like_the_random_mode(full_ws, tmp_path):
    """`--weights random.safetensors` is a file, not the random mode."""
    r = CliRunner().invoke(
        featcache_app,
        [
            "extract",
            "--encoder",
            "tiny-cnn",
            "--dataset",
            "tiny",
            "--weights",
            str(tmp_path / "random.safetensors"),
            "--workspace",
            str(full_ws),
        ],
    )
    refused(r, "no such file")


# --------------------------------------------------------------------------- the workspace
def test_workspace_that_is_a_file(p1, tmp_path):
    path = tmp_path / "ws-file"
    path.write_text("not a folder")
    r = CliRunner().invoke(featcache_app, [*prepare_args("--sample", f"P1={p1}"), "--workspace", str(path)])
    refused(r, "is a file")
    assert path.read_text() == "not a folder"


def test_workspace_under_a_file(p1, tmp_path):
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(
        featcache_app, [*prepare_args("--sample", f"P1={p1}"), "--workspace", str(tmp_path / "file" / "ws")]
    )
    refused(r, "blocked by a file")


def test_damaged_dataset_json(full_ws):
    path = full_ws / "datasets" / "tiny" / "dataset.json"
    path.write_text(path.read_text()[:50])
    check(
        featcache_app,
        full_ws,
        ["extract", "--encoder", "tiny-cnn", "--weights", "random:0", "--dataset", "tiny"],
        "damaged",
    )
    check(
        train_app,
        full_ws,
        ["decoder", "--fold", "P1", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny"],
        "damaged",
    )


def test_info_and_verify_on_a_non_store(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for target in ("folder", "file", "missing"):
        refused(CliRunner().invoke(featcache_app, ["info", str(tmp_path / target)]), "not a feature store")
        refused(CliRunner().invoke(featcache_app, ["verify", str(tmp_path / target)]), "not a feature store")


# --------------------------------------------------------------------------- feature-store outputs: no data loss
def test_output_into_the_workspace_or_its_datasets_is_refused(full_ws):
    base = ["extract", "--encoder", "tiny-cnn", "--weights", "random:7", "--dataset", "tiny"]
    for target in (
        full_ws,
        full_ws / "datasets",
        full_ws / "datasets" / "tiny" / "patches.zarr",
        full_ws / "runs" / "x",
    ):
        for extra in ([], ["--overwrite"]):
            message = check(featcache_app, full_ws, [*base, "--output", str(target), *extra], "--output")
            assert "featcache did not make" in message or "must not touch" in message


def test_output_into_a_users_folder_is_refused_even_with_overwrite(full_ws, tmp_path):
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    other_zarr = tmp_path / "other.zarr"
    other_zarr.mkdir()
    (other_zarr / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    base = ["extract", "--encoder", "tiny-cnn", "--weights", "random:7", "--dataset", "tiny"]
    for target, needle in ((mine, "featcache did not make"), (other_zarr, "did not make")):
        before = snapshot(target)
        for extra in ([], ["--overwrite"]):
            check(featcache_app, full_ws, [*base, "--output", str(target), *extra], needle)
        assert snapshot(target) == before


def test_a_store_of_another_identity_is_replaced_only_with_overwrite(full_ws):
    store = full_ws / "features" / "tiny" / "tiny-cnn-random.zarr"
    args = ["extract", "--encoder", "tiny-cnn", "--weights", "random:0", "--dataset", "tiny", "--chunk-patches", "3"]
    check(featcache_app, full_ws, args, "different identity", "--overwrite")
    r = CliRunner().invoke(featcache_app, [*args, "--overwrite", "--workspace", str(full_ws)])
    assert r.exit_code == 0, r.output
    assert json.loads((store / "zarr.json").read_text())["attributes"]["identity"]["chunk_patches"] == 3


# --------------------------------------------------------------------------- missing and corrupt chunks
def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_deleted_image_or_target_chunk_is_noticed(full_ws):
    targets = full_ws / "datasets" / "tiny" / "targets.zarr" / "P1"
    (targets / "mask" / "c" / "0" / "0" / "0").unlink()
    check(
        train_app,
        full_ws,
        [
            "decoder",
            "--fold",
            "P2",
            "--encoder",
            "tiny-cnn",
            "--mode",
            "random",
            "--dataset",
            "tiny",
            "--val-fraction",
            "0",
            "--epochs",
            "1",
        ],
        "lacks chunk file",
        "mask",
    )
    (full_ws / "datasets" / "tiny" / "patches.zarr" / "P2" / "image" / "c" / "0" / "0" / "0" / "0").unlink()
    check(
        featcache_app,
        full_ws,
        ["extract", "--encoder", "tiny-cnn", "--weights", "random:9", "--dataset", "tiny"],
        "lacks chunk file",
        "image",
    )
    r = CliRunner().invoke(featcache_app, ["verify", str(full_ws / "datasets" / "tiny")])
    assert r.exit_code == 1 and "P1/mask: chunk file" in r.output and "P2/image: chunk file" in r.output


def test_corrupt_image_chunk_stops_extract_with_its_name(full_ws):
    corrupt(full_ws / "datasets" / "tiny" / "patches.zarr" / "P2" / "image" / "c" / "0" / "0" / "0" / "0")
    check(
        featcache_app,
        full_ws,
        [
            "extract",
            "--encoder",
            "tiny-cnn",
            "--weights",
            "random:4",
            "--dataset",
            "tiny",
            "--output",
            str(full_ws.parent / "new.zarr"),
        ],
        "patches.zarr/P2/image",
        "chunk 0",
    )


def test_corrupt_target_chunk_names_store_array_and_chunk(full_ws):
    corrupt(full_ws / "datasets" / "tiny" / "targets.zarr" / "P2" / "counts" / "c" / "0" / "0" / "0" / "0")
    message = check(
        train_app,
        full_ws,
        ["decoder", "--fold", "P1", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny", "--epochs", "1"],
        "targets.zarr/P2/counts",
        "chunk 0",
    )
    assert "featcache verify" in message


def test_corrupt_feature_chunk_then_repair_recomputes_exactly_that_chunk(full_ws):
    store = full_ws / "features" / "tiny" / "tiny-cnn-random.zarr"
    chunk = store / "P1" / "tokens" / "c" / "0" / "0" / "0" / "0"
    good = chunk.read_bytes()
    others = {p: p.read_bytes() for p in store.rglob("c/*/*/*/*") if p != chunk and p.is_file()}
    corrupt(chunk)
    message = check(
        train_app,
        full_ws,
        ["decoder", "--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny", "--epochs", "1"],
        "tiny-cnn-random.zarr/P1/tokens",
    )
    assert "--repair" in message
    r = CliRunner().invoke(featcache_app, ["verify", str(store)])
    assert r.exit_code == 1 and "--repair" in r.output
    r = CliRunner().invoke(featcache_app, ["verify", "--repair", str(store)])
    assert r.exit_code == 1 and "dropped the markers of 1" in r.output
    r = CliRunner().invoke(
        featcache_app,
        ["extract", "--encoder", "tiny-cnn", "--weights", "random:0", "--dataset", "tiny", "--workspace", str(full_ws)],
    )
    assert r.exit_code == 0 and "extracted 5 patches" in r.output and "5 already done" in r.output, r.output
    assert chunk.read_bytes() == good
    assert all(p.read_bytes() == b for p, b in others.items())
    assert CliRunner().invoke(featcache_app, ["verify", str(store)]).exit_code == 0


# --------------------------------------------------------------------------- run folders from elsewhere
class Payload:
    """A pickle that runs code when loaded: it would create the file named in ``flag``."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def test_planted_pickle_in_a_run_folder_never_runs(full_ws, tmp_path):
    flag = tmp_path / "payload-ran"
    args = [
        "decoder",
        "--fold",
        "P1",
        "--encoder",
        "tiny-cnn",
        "--mode",
        "random",
        "--dataset",
        "tiny",
        "--val-fraction",
        "0",
        "--decoder",
        "linear",
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--val-fraction",
        "0",
    ]
    run_dir = full_ws / "runs" / "tiny" / "tiny-cnn" / "random-linear" / "fold-P1"
    # 1. planted in a folder with no config.json
    run_dir.mkdir(parents=True)
    with open(run_dir / "train_state.pt", "wb") as fh:
        pickle.dump({"epoch": 0, "model": Payload(str(flag))}, fh)
    check(train_app, full_ws, args, "no config.json")
    assert not flag.exists()
    # 2. planted beside a real config.json, as if a run had been interrupted
    shutil.rmtree(run_dir)
    r = CliRunner().invoke(train_app, [*args, "--workspace", str(full_ws)])
    assert r.exit_code == 0, r.output
    (run_dir / "metrics.json").unlink()
    import torch

    torch.save({"epoch": 0, "model": Payload(str(flag)), "log": "[]"}, run_dir / "train_state.pt")
    check(train_app, full_ws, args, "refusing to load", "train_state.pt")
    assert not flag.exists()
    # 3. a checkpoint is never unpickled either
    from featcache.errors import FeatcacheError
    from featcache.stores import RunDir

    torch.save({"state_dict": Payload(str(flag))}, run_dir / "checkpoint.pt")
    with pytest.raises(FeatcacheError, match="refusing to load"):
        RunDir(run_dir).load_checkpoint()
    assert not flag.exists()


def test_refused_training_run_leaves_nothing_that_blocks_the_corrected_rerun(full_ws):
    args = [
        "decoder",
        "--fold",
        "P1",
        "--encoder",
        "tiny-cnn",
        "--mode",
        "random",
        "--dataset",
        "tiny",
        "--val-fraction",
        "0",
        "--decoder",
        "linear",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--val-fraction",
        "0",
    ]
    check(train_app, full_ws, [*args, "--lr", "-1"], "--lr")
    r = CliRunner().invoke(train_app, [*args, "--workspace", str(full_ws)])
    assert r.exit_code == 0, r.output


def test_stale_partial_folders_of_killed_prepares_are_cleaned(p1, ws):
    from featcache.stores.files import partial_name

    (ws / "datasets" / partial_name("bad", pid=999999999)).mkdir(parents=True)  # no such process on this host
    alive = ws / "datasets" / partial_name("bad")  # a prepare still running
    alive.mkdir()
    elsewhere = ws / "datasets" / partial_name("bad", pid=999999999, host="otherhost")  # another host's: its own
    elsewhere.mkdir()
    r = CliRunner().invoke(featcache_app, [*prepare_args("--sample", f"P1={p1}"), "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (ws / "datasets").iterdir()) == sorted([alive.name, elsewhere.name, "bad"])


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featcache",
            "prepare",
            "--dataset",
            "x",
            "--sample",
            f"P1={tmp_path / 'missing'}",
            "--workspace",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- run folders: verified before use
@pytest.fixture(scope="module")
def runs_ws(tiny_cnn_features, tmp_path_factory):
    """A workspace with two finished random-init linear runs of both folds and their comparison file."""
    from conftest import run_fold

    from train.summary import summarize

    src, _ = tiny_cnn_features
    ws = tmp_path_factory.mktemp("runs-ws")
    for sub in ("datasets", "features"):
        shutil.copytree(src / sub, ws / sub)
    for fold in ("P1", "P2"):
        for name in (None, "b"):  # two runs to compare
            run_fold(
                "tiny",
                "tiny-cnn",
                fold,
                mode="random",
                decoder="linear",
                epochs=1,
                batch_size=2,
                workspace=ws,
                name=name,
            )
    summarize("tiny", ws)
    return ws


@pytest.fixture
def run_ws(runs_ws, tmp_path):
    """A copy of ``runs_ws`` a test may damage; (workspace, P1's run folder)."""
    ws = tmp_path / "rws"
    shutil.copytree(runs_ws, ws, symlinks=True)
    return ws, ws / "runs" / "tiny" / "tiny-cnn" / "random-linear" / "fold-P1"


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=2))


def rehash(cfg: dict) -> None:
    from featcache.stores.runs import config_digest

    cfg["config_sha256"] = config_digest(cfg)


CONFIG_EDITS = {
    "weights": lambda c: c["features"]["identity"].update(weights="random:7"),
    "gene_ids": lambda c: c["gene_ids"].reverse(),
    "encoder": lambda c: c.update(encoder="densenet121"),
    "mode": lambda c: c.update(mode="frozen"),
}


def run_commands(ws: Path, run_dir: Path, synth_dir: Path) -> dict:
    image = synth_dir / "P1" / "P1_tissue_image.btf"
    predict = ["predict", "--run", str(run_dir), "--image", str(image), "--positions", str(synth_dir / "P1")]
    return {
        "predict": (featcache_app, [*predict, "--device", "cpu"]),
        "summarize": (train_app, ["summarize", "--dataset", "tiny"]),
        "compare": (analysis_app(), ["compare", "--dataset", "tiny", "--bootstrap", "100"]),
        "export": (analysis_app(), ["export", "--run", str(run_dir)]),
        "figures": (analysis_app(), ["figures", "--dataset", "tiny", "--sample", "P1"]),
    }


def check_cmd(ws: Path, command: tuple, *needles) -> str:
    app, args = command
    return check(app, ws, args, *needles)


def analysis_app():
    from analysis.cli import app

    return app


@pytest.mark.parametrize("edit", sorted(CONFIG_EDITS))
def test_an_edited_config_json_is_refused_by_every_reader(run_ws, synth_dir, edit):
    ws, run_dir = run_ws
    edit_json(run_dir / "config.json", CONFIG_EDITS[edit])
    for name, (app, args) in run_commands(ws, run_dir, synth_dir).items():
        message = check(app, ws, args, "config.json", "config_sha256")
        assert str(run_dir / "config.json") in message, (name, message)


def test_a_config_json_edited_and_rehashed_is_refused_by_the_files_beside_it(run_ws, synth_dir):
    ws, run_dir = run_ws
    config = (run_dir / "config.json").read_bytes()
    edit_json(run_dir / "config.json", lambda c: (c["gene_ids"].reverse(), rehash(c)))
    commands = run_commands(ws, run_dir, synth_dir)
    check_cmd(ws, commands["predict"], "metrics.json", "another run")
    check_cmd(ws, commands["summarize"], "metrics.json", "another run")
    # a checkpoint of another run beside a consistent config.json and metrics.json
    (run_dir / "config.json").write_bytes(config)
    shutil.copy(run_dir.parent / "fold-P2" / "checkpoint.pt", run_dir / "checkpoint.pt")
    check_cmd(ws, commands["predict"], "checkpoint.pt", "another run")


def test_a_copied_run_folder_with_one_genes_score_edited_is_refused(run_ws, synth_dir):
    ws, run_dir = run_ws
    metrics = run_dir / "metrics.json"
    gene = sorted(json.loads(metrics.read_text())["per_gene"])[0]
    edit_json(metrics, lambda m: m["per_gene"][gene].update(pcc=0.9))  # config_sha256 and metrics_sha256 kept
    comparison = (ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_bytes()
    readers = run_commands(ws, run_dir, synth_dir)
    readers.pop("compare")  # it scores the predictions themselves, never metrics.json
    for name, (app, args) in readers.items():
        message = check(app, ws, args, str(metrics), "metrics_sha256", "--overwrite")
        assert "config_sha256" not in message, (name, message)
    assert (ws / "results" / "tiny" / "encoder_loocv_comparison.json").read_bytes() == comparison


def test_export_failing_mid_write_leaves_nothing_beside_its_output_and_keeps_the_old_one(run_ws, monkeypatch):
    import anndata

    ws, run_dir = run_ws
    out = ws / "exports" / "run.h5ad"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")
    write = anndata.AnnData.write_h5ad

    def disk_fills(self, filename, *args, **kwargs):  # the file is written, then its last flush finds the disk full
        write(self, filename, *args, **kwargs)
        assert Path(filename).is_file() and Path(filename).parent == out.parent
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", disk_fills)
    check(analysis_app(), ws, ["export", "--run", str(run_dir), "--output", str(out), "--overwrite"], "disk is full")
    assert [p.name for p in out.parent.iterdir()] == ["run.h5ad"] and out.read_bytes() == b"an earlier export"
    monkeypatch.undo()  # an --output that is a folder: refused by its name before anything is written
    folder = ws / "exports" / "folder.h5ad"
    (folder / "inside").mkdir(parents=True)
    args = ["export", "--run", str(run_dir), "--output", str(folder), "--overwrite"]
    assert ".partial" not in check(analysis_app(), ws, args, f"{folder} is a folder", "--output")


def test_a_run_folder_copied_into_another_folds_place_is_refused(run_ws, synth_dir):
    ws, run_dir = run_ws
    shutil.rmtree(run_dir.parent / "fold-P2")
    shutil.copytree(run_dir, run_dir.parent / "fold-P2")
    for name in ("summarize", "compare", "figures"):  # refused, the copy named beside the fold it holds
        check_cmd(ws, run_commands(ws, run_dir, synth_dir)[name], "fold-P1", "fold-P2")


def test_predictions_of_another_run_or_unreadable_are_refused(run_ws, synth_dir):
    ws, run_dir = run_ws
    commands = run_commands(ws, run_dir, synth_dir)
    zarr_json = run_dir / "predictions.zarr" / "zarr.json"
    zarr_json.write_text("{ not json")
    for name in ("compare", "export", "figures"):
        check_cmd(ws, commands[name], "cannot read", "predictions.zarr")
    # another run's predictions (run "b" of the same fold: same panel, same shapes) copied into this folder
    shutil.rmtree(run_dir / "predictions.zarr")
    shutil.copytree(
        run_dir.parent.parent / "random-linear-b" / "fold-P1" / "predictions.zarr", run_dir / "predictions.zarr"
    )
    for name in ("compare", "export", "figures"):
        check_cmd(ws, commands[name], str(run_dir / "predictions.zarr"), "config_sha256", "another run", "--overwrite")


def test_verify_reads_the_origins_and_names_a_missing_array(full_ws):
    store = full_ws / "features" / "tiny" / "tiny-cnn-random.zarr"
    corrupt(store / "P2" / "origin" / "c" / "0" / "0")
    r = CliRunner().invoke(featcache_app, ["verify", str(store)])
    assert r.exit_code == 1 and "P2/origin: corrupted" in r.output, r.output
    shutil.rmtree(store / "P1" / "tokens")
    r = CliRunner().invoke(featcache_app, ["verify", str(store)])
    assert r.exit_code == 1 and "P1/tokens: array missing" in r.output and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    r = CliRunner().invoke(featcache_app, ["verify", "--dataset", "tiny", "--workspace", str(full_ws)])
    assert r.exit_code == 1 and "P1/tokens: array missing" in r.output and "P2/origin: corrupted" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)


def test_positions_of_another_slide_are_refused(run_ws, synth_dir):
    ws, run_dir = run_ws
    for img, pos in (("P1", "P2"), ("P2", "P1")):  # every foreign pair: Space Ranger's own image of P2 is not P1
        image = synth_dir / img / f"{img}_tissue_image.btf"
        args = ["predict", "--run", str(run_dir), "--image", str(image), "--positions", str(synth_dir / pos)]
        lowres = synth_dir / pos / BIN8 / "spatial" / "tissue_lowres_image.png"
        check(featcache_app, ws, [*args, "--device", "cpu"], "do not belong to", str(image), str(lowres), "correlate")


def test_own_positions_pass_the_image_check_also_recoloured(synth_dir, tmp_path):
    from featcache.slide import Slide
    from pipeline.predict import positions_lattice

    for name in ("P1", "P2"):
        image = synth_dir / name / f"{name}_tissue_image.btf"
        rgb = sample_image(synth_dir / name).astype(np.float32)
        # a re-export of the same scan, brighter and with another stain balance: NCC of grey levels shrugs it off
        other = np.clip(255 * (rgb / 255) ** np.array([0.7, 0.9, 1.2]) + 12, 0, 255).astype(np.uint8)
        recoloured = tmp_path / f"{name}.tif"
        tifffile.imwrite(recoloured, other, photometric="rgb")
        for path in (image, recoloured):
            with Slide(path) as slide:
                slide.probe()
                lattice = positions_lattice(name, synth_dir / name, path, 32, 0.5, slide)
            assert lattice.checks["image_ncc"] > 0.9, (path, lattice.checks)
            assert lattice.checks["image_check"].endswith("tissue_lowres_image.png")


def test_positions_without_space_rangers_images_fall_back_to_the_tissue_overlap(run_ws, synth_dir, tmp_path):
    from featcache.slide import Slide
    from pipeline.predict import positions_lattice

    ws, run_dir = run_ws
    bare = {name: clone_sample(synth_dir / name, tmp_path / name) for name in ("P1", "P2")}
    for sample in bare.values():
        for png in ("tissue_lowres_image.png", "tissue_hires_image.png"):
            (spatial(sample) / png).unlink()
    image = synth_dir / "P1" / "P1_tissue_image.btf"
    args = ["predict", "--run", str(run_dir), "--image", str(image), "--positions", str(bare["P2"]), "--device", "cpu"]
    check(featcache_app, ws, args, "do not belong to", "in-tissue bins", "image check was not possible")
    with Slide(image) as slide:  # its own positions still pass, on the overlap alone, and the record says so
        slide.probe()
        lattice = positions_lattice("P1", bare["P1"], image, 32, 0.5, slide)
    assert lattice.checks["image_check"].startswith("not possible: no tissue_lowres_image.png")
    assert lattice.checks["in_tissue_bins_on_tissue"] > 0.9


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name or ".tmp" in p.name)


def test_a_slide_file_name_with_spaces_and_brackets_predicts_correctly(run_ws, synth_dir, tmp_path):
    import xarray as xr

    ws, run_dir = run_ws
    image = tmp_path / "my slide (2).btf"
    image.symlink_to(synth_dir / "P1" / "P1_tissue_image.btf")
    base = ["predict", "--run", str(run_dir), "--image", str(image), "--positions", str(synth_dir / "P1")]
    theirs = xr.open_zarr(run_dir / "predictions.zarr").pred.values
    for extra, out in (
        ([], ws / "predictions" / "tiny-tiny-cnn-random-linear-fold-P1" / "my_slide_2"),
        (["--output", str(tmp_path / "out")], tmp_path / "out"),
    ):
        r = CliRunner().invoke(featcache_app, [*base, *extra, "--device", "cpu", "--workspace", str(ws)])
        assert r.exit_code == 0, r.output
        z = xr.open_zarr(out / "predictions.zarr").z.values.astype(np.float32)
        assert np.allclose(z, theirs, atol=2e-3 * np.abs(theirs).max() + 1e-3)  # the run's own test predictions
        assert json.loads((out / "prediction.json").read_text())["lattice"]["name"] == "my_slide_2"
    assert leftovers(ws) == [] and leftovers(tmp_path) == []


def test_a_killed_prediction_is_cleaned_by_the_rerun(run_ws, synth_dir, tmp_path):
    import signal
    import time

    ws, run_dir = run_ws
    out = tmp_path / "pred"
    args = ["predict", "--run", str(run_dir), "--image", str(synth_dir / "P1" / "P1_tissue_image.btf")]
    args += ["--positions", str(synth_dir / "P1"), "--output", str(out), "--device", "cpu", "--workspace", str(ws)]
    args += ["--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "featcache", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".pred.partial-*/predictions.zarr")) and proc.poll() is None:
        assert time.monotonic() < deadline, "predict never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert leftovers(tmp_path) and not out.exists()  # what the kill left
    r = CliRunner().invoke(featcache_app, args)
    assert r.exit_code == 0, r.output
    assert leftovers(tmp_path) == [] and (out / "prediction.json").is_file()


def test_grayscale_png_and_placeholder_tiff_resolution_get_their_own_messages(run_ws, synth_dir, tmp_path):
    ws, run_dir = run_ws
    rgb = sample_image(synth_dir / "P1")[:800, :800]
    grey = tmp_path / "grey.png"
    Image.fromarray(rgb[..., 0]).save(grey)
    base = ["predict", "--run", str(run_dir), "--device", "cpu", "--image"]
    check(featcache_app, ws, [*base, str(grey), "--mpp", "0.5"], "single-channel", "RGB")
    tagged = tmp_path / "tagged.tif"
    tifffile.imwrite(tagged, rgb, photometric="rgb", resolution=(72, 72), resolutionunit="CENTIMETER")
    message = check(featcache_app, ws, [*base, str(tagged)], "TIFF resolution tags", "138.9", "Pass the scan's --mpp")
    assert "--mpp 138.9" not in message


def test_a_damaged_predictions_chunk_is_one_message(run_ws, synth_dir):
    ws, run_dir = run_ws
    corrupt(run_dir / "predictions.zarr" / "pred" / "c" / "0" / "0" / "0" / "0")
    commands = run_commands(ws, run_dir, synth_dir)
    for name in ("compare", "export", "figures"):
        check_cmd(ws, commands[name], "cannot read pred of", "predictions.zarr", "damaged")


def test_figures_refuse_genes_outside_the_panel_and_a_missing_comparison_file_before_writing(run_ws):
    ws, _ = run_ws
    app = analysis_app()
    check(app, ws, ["figures", "--dataset", "tiny", "--genes", "FOO,BAR"], "FOO, BAR not in the panel")
    check(app, ws, ["figures", "--dataset", "tiny", "--sample", "P9"], "--sample P9")
    (ws / "results" / "tiny" / "encoder_loocv_comparison.json").unlink()
    check(app, ws, ["figures", "--dataset", "tiny"], "no results file", "train summarize")


def test_an_edited_config_json_is_not_resumed_or_reused(full_ws):
    args = ["decoder", "--fold", "P1", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny"]
    args += ["--decoder", "linear", "--epochs", "1", "--batch-size", "2", "--val-fraction", "0"]
    r = CliRunner().invoke(train_app, [*args, "--workspace", str(full_ws)])
    assert r.exit_code == 0, r.output
    run_dir = full_ws / "runs" / "tiny" / "tiny-cnn" / "random-linear" / "fold-P1"
    edit_json(run_dir / "config.json", CONFIG_EDITS["gene_ids"])  # the same config_sha256, other settings
    check(train_app, full_ws, args, "config.json", "config_sha256")  # a finished run is not reused
    (run_dir / "metrics.json").unlink()
    check(train_app, full_ws, args, "config.json", "config_sha256")  # nor an unfinished one resumed


def test_figures_with_a_damaged_patches_chunk_write_nothing(run_ws):
    ws, _ = run_ws
    corrupt(ws / "datasets" / "tiny" / "patches.zarr" / "P1" / "image" / "c" / "0" / "0" / "0" / "0")
    check(analysis_app(), ws, ["figures", "--dataset", "tiny", "--sample", "P1"], "patches.zarr/P1/image", "chunk 0")


def test_figures_refuse_a_listed_run_folder_missing_on_disk(run_ws):
    ws, run_dir = run_ws
    gone = run_dir.parent.parent / "random-linear-b" / "fold-P2"
    shutil.rmtree(gone)
    check(analysis_app(), ws, ["figures", "--dataset", "tiny"], str(gone), "not on disk", "train summarize")


def test_figures_without_default_genes_in_the_panel_draw_the_best_by_pcc(run_ws, monkeypatch):
    import analysis.figures

    ws, run_dir = run_ws
    monkeypatch.setattr(analysis.figures, "DEFAULT_GENES", ("NOT-IN-ANY-PANEL",))  # a panel without them
    runs = sorted(run_dir.parent.parent.iterdir())  # the two runs, both testing on P1
    per_run = [json.loads((d / "fold-P1" / "metrics.json").read_text())["per_gene"] for d in runs]
    panel = json.loads((runs[0] / "fold-P1" / "config.json").read_text())["genes"]
    unique = [g for g in panel if panel.count(g) == 1]  # a repeated name names no single map
    pcc = {g: [p[g]["pcc"] for p in per_run if p[g]["pcc"] is not None] for g in unique}
    best = sorted(pcc, key=lambda g: -np.mean(pcc[g]) if pcc[g] else 1)[:6]
    r = CliRunner().invoke(analysis_app(), ["figures", "--dataset", "tiny", "--sample", "P1", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("spatial rows of "))
    assert "none of the default genes is in the panel" in line, r.output
    assert set(line.removeprefix("spatial rows of ").split(" (")[0].split(", ")) == set(best), (line, best)
    drawn = {p.name.split("_")[1] for p in (ws / "results" / "tiny" / "figures" / "spatial").glob("*.png")}
    assert drawn == set(best), (drawn, best)
