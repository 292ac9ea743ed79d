"""One per-bin average, one AnnData layout, one staged write: each used by every stage that needs it.

Overlapping patches (stride 16) of a real prepared dataset and a real run: the average the metrics
score, the stitched map and the exported .h5ad agree bin for bin.
"""

from __future__ import annotations

import os
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import run_fold

import analysis
from analysis.export import export_h5ad
from featcache.geometry import BinSums, gather_windows
from featcache.stores.files import staged_dir, staged_file
from featcache.stores.h5ad import BinRows, BinsH5adWriter, bins_anndata
from train import run as fold_run
from train.metrics import evaluate


@pytest.fixture(scope="module")
def overlapping_run(synth_dir, tmp_path_factory):
    """Dataset 'half' cut at stride 16 (each bin in up to four patches), random tiny-cnn features, a run on P2."""
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset

    ws = tmp_path_factory.mktemp("bins-ws")
    samples = {"P1": str(synth_dir / "P1"), "P2": str(synth_dir / "P2")}
    prepare_dataset("half", samples, stride=16, workspace=ws, show_progress=False)
    extract("half", ExtractionConfig("tiny-cnn", "random:0"), workspace=ws, show_progress=False)
    res = run_fold("half", "tiny-cnn", "P2", mode="random", decoder="linear", epochs=1, batch_size=4, workspace=ws)
    return ws, res.run_dir


def test_the_average_the_metrics_score_is_the_stitched_map_and_the_exported_h5ad(overlapping_run):
    ws, run_dir = overlapping_run
    run = analysis.open_run(run_dir)
    origins, genes = run.origin.values, [str(g) for g in run.gene.values]
    assert np.diff(np.unique(origins[:, 0])).min() == 16 and np.diff(np.unique(origins[:, 1])).min() == 16
    test = fold_run.TestSet(run.pred.values, run.truth.values, run.mask.values, origins, run["sample"].values)
    pred, truth, points, maps = test.scored(all_bins=False)
    assert not np.array_equal(pred, test.pred)  # overlapping patches do disagree before averaging

    # the run's metrics were computed on exactly these arrays
    metrics = run.attrs["metrics"]
    again = evaluate(pred, truth, points, np.zeros(len(genes)), genes, ssim_mask=maps)
    for key in ("pcc_gene", "pcc_global", "mse", "n_bins"):
        assert again[key] == metrics[key], key

    # bin for bin, every gene: the scored patch maps are windows of analysis.stitch's map
    maps_of = [analysis.stitch(run, g) for g in genes]
    stitched = np.stack([m.values for m in maps_of])  # (gene, row, col)
    top_left = np.array([int(maps_of[0].array_row[0]), int(maps_of[0].array_col[0])])
    local = origins - top_left
    for g in range(len(genes)):
        assert np.array_equal(pred[:, g], gather_windows(stitched[g], local).astype(pred.dtype))

    # each in-tissue bin is counted once in the point metrics
    where = np.argwhere(points)
    counted = origins[where[:, 0]] + where[:, 1:]
    tissue = np.argwhere(np.isfinite(stitched[0]) & (analysis.stitch(run, genes[0], "mask").values > 0.5)) + top_left
    assert len(np.unique(counted, axis=0)) == len(counted) == len(tissue)
    assert np.array_equal(np.unique(counted, axis=0), tissue)

    # the exported .h5ad holds the same averages, one observation per bin of the test section
    path, _ = export_h5ad(run_dir, workspace=ws)
    a = ad.read_h5ad(path)
    rows, cols = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    assert a.n_obs == np.isfinite(stitched[0]).sum() and a.obs_names.is_unique
    assert np.array_equal(a.X, stitched[:, rows - top_left[0], cols - top_left[1]].T.astype(np.float32))
    first = {tuple(rc): (p, i, j) for (p, i, j), rc in zip(where, counted)}
    k = np.array([first.get((r, c)) is not None for r, c in zip(rows, cols)])
    at = np.array([first[(r, c)] for r, c in zip(rows[k], cols[k])])
    assert k.sum() == len(counted) and np.array_equal(a.X[k], pred[at[:, 0], :, at[:, 1], at[:, 2]])
    assert np.array_equal(a.obs["in_tissue"].to_numpy()[k], np.ones(k.sum(), np.int8))


def test_bin_sums_average_only_the_patches_holding_a_bin():
    origins = np.array([[10, 20], [10, 36], [26, 20]])
    maps = np.stack([np.full((1, 32, 32), v, np.float32) for v in (1.0, 2.0, 4.0)])
    sums = BinSums(origins, maps)
    grid = sums.grid()[0]
    assert grid.shape == (48, 48) and tuple(sums.top_left) == (10, 20)
    assert grid[0, 0] == 1 and grid[0, 20] == 1.5 and grid[20, 0] == 2.5 and np.isnan(grid[40, 40])
    coords, values = sums.table()
    assert len(coords) == np.isfinite(grid).sum() and np.array_equal(coords[0], [10, 20])
    assert values[:, 0].tolist() == grid[np.isfinite(grid)].tolist()  # rows sorted by (row, col)
    first = sums.first()
    assert first[0].all() and not first[1][:, :16].any() and first[1][:, 16:].all() and first[2][16:].all()
    keep = np.zeros((3, 32, 32), bool)
    keep[1] = True  # only the second patch takes part
    coords, values = BinSums(origins, maps, keep).table()
    assert len(coords) == 32 * 32 and (values == 2).all() and np.array_equal(coords[0], [10, 36])


@pytest.mark.filterwarnings("error::anndata.OldFormatWarning")
def test_the_h5ad_written_band_by_band_is_the_one_written_whole(tmp_path):
    rng = np.random.default_rng(0)
    genes, ids = ["EPCAM", "DES", "CD74"], ["ENSG1", "ENSG2", "ENSG3"]

    def rows(sample, coords):
        n = len(coords)
        xy = rng.random((n, 2)) * 1000
        return BinRows(sample, np.array(coords), rng.random(n) > 0.3, rng.random((n, 3)), {"z": rng.random((n, 3))}, xy)

    bands = [rows("S1", [[0, 0], [0, 1], [3, 2]]), rows("S1", [[64, 5]]), rows("S1", np.zeros((0, 2), int))]
    uns = {"featcache": {"run": "r"}, "spatial": {"S1": {"images": {"hires": np.zeros((4, 6, 3), np.uint8)}}}}
    with BinsH5adWriter(tmp_path / "bands.h5ad", genes, ids, ["S1"], layers=("z",)) as h5:
        for band in bands:
            h5.append(band)
        h5.finish(uns)
    bins_anndata(bands, genes, ids, uns=uns).write_h5ad(tmp_path / "whole.h5ad")
    a, b = ad.read_h5ad(tmp_path / "bands.h5ad"), ad.read_h5ad(tmp_path / "whole.h5ad")
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert a.obs_names.tolist() == ["S1_00000_00000", "S1_00000_00001", "S1_00003_00002", "S1_00064_00005"]
    assert a.X.dtype == np.float32 and np.array_equal(a.X, b.X) and np.array_equal(a.layers["z"], b.layers["z"])
    assert np.array_equal(a.obsm["spatial"], b.obsm["spatial"]) and a.var["gene_id"].tolist() == ids
    assert np.array_equal(a.uns["spatial"]["S1"]["images"]["hires"], uns["spatial"]["S1"]["images"]["hires"])
    assert a.uns["featcache"] == b.uns["featcache"] == {"run": "r"}


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_staged_write_leaves_no_partial_and_the_old_target_as_it_was(tmp_path):
    target = tmp_path / "store"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with staged_dir(target) as partial:
            (partial / "new.txt").write_text("half")
            raise OSError("disk full")
    assert hidden(tmp_path) == [] and [p.name for p in target.iterdir()] == ["old.txt"]
    file = tmp_path / "export.h5ad"
    file.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with staged_file(file) as tmp:
            tmp.write_bytes(b"ha")
            raise KeyboardInterrupt
    assert hidden(tmp_path) == [] and file.read_bytes() == b"old"
    # a commit that cannot move the file into place (a folder is in the way) removes it too
    with pytest.raises(OSError):
        with staged_file(target) as tmp:
            tmp.write_bytes(b"new")
    assert hidden(tmp_path) == [] and (target / "old.txt").read_text() == "old"
    # success replaces the target whole, and leaves nothing beside it
    with staged_dir(target) as partial:
        (partial / "new.txt").write_text("new")
    assert hidden(tmp_path) == [] and [p.name for p in target.iterdir()] == ["new.txt"]


def test_stale_partials_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    from featcache.stores.files import STALE_ELSEWHERE_S, partial_name

    dead_dir = tmp_path / partial_name("store", pid=999999999)
    dead_dir.mkdir()
    (dead_dir / "chunk").write_bytes(b"x")
    (tmp_path / partial_name("store", pid=999999998)).write_bytes(b"x")  # a staged file's
    (tmp_path / ".store.old-0000beef").mkdir()  # set aside by a replacement that was killed
    live = tmp_path / partial_name("store")
    live.mkdir()
    other = tmp_path / partial_name("storeroom", pid=999999999)  # another artefact's: not ours to judge
    other.mkdir()
    # on a shared filesystem: another host's writer, whose pid means nothing here, is left alone ...
    elsewhere = tmp_path / partial_name("store", pid=999999999, host="otherhost")
    elsewhere.mkdir()
    legacy = tmp_path / ".store.partial-999999999-dead0000"  # named before partials carried a host: whose?
    legacy.mkdir()
    # ... unless it has not changed for longer than any write takes
    abandoned = tmp_path / partial_name("store", pid=1, host="otherhost")
    abandoned.mkdir()
    week_ago = time.time() - STALE_ELSEWHERE_S - 60
    os.utime(abandoned, (week_ago, week_ago))
    kept = [live.name, other.name, elsewhere.name, legacy.name]
    with staged_dir(tmp_path / "store") as partial:
        assert sorted(hidden(tmp_path)) == sorted([*kept, partial.name])
    assert hidden(tmp_path) == sorted(kept) and (tmp_path / "store").is_dir()
