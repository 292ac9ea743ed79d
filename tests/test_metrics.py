"""The metrics, against scipy and scikit-image on the same arrays; collapsed genes are not rewarded."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from skimage.metrics import structural_similarity

from featcache.errors import FeatcacheError
from train.metrics import evaluate


def test_metrics_agree_with_scipy_and_skimage():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(5, 4, 32, 32))
    truth[:, 3] = 1.5  # a gene constant in truth: excluded and counted
    pred = 0.6 * truth + rng.normal(size=truth.shape)
    mask = rng.random((5, 32, 32)) > 0.25
    fill = np.array([0.1, -0.2, 0.0, 0.3])
    m = evaluate(pred, truth, mask, fill, ["A", "B", "C", "D"])
    for g, name in enumerate("ABC"):
        t, p = truth[:, g][mask], pred[:, g][mask]
        assert m["per_gene"][name]["pcc"] == pytest.approx(pearsonr(p, t)[0], abs=1e-6)
        assert m["per_gene"][name]["spearman"] == pytest.approx(spearmanr(p, t)[0], abs=1e-6)
        dr = t.max() - t.min()
        per_patch = []
        for i in range(5):
            _, full = structural_similarity(
                np.where(mask[i], truth[i, g], fill[g]),
                np.where(mask[i], pred[i, g], fill[g]),
                win_size=7,
                data_range=dr,
                K1=0.01,
                K2=0.03,
                full=True,
            )
            per_patch.append(full[3:-3, 3:-3][mask[i, 3:-3, 3:-3]].mean())  # windows centred on scored bins
        assert m["per_gene"][name]["ssim"] == pytest.approx(np.mean(per_patch), abs=1e-6)
        if g == 0:  # every bin scored: scikit-image's own mean SSIM
            whole = evaluate(pred, truth, np.ones_like(mask), fill, ["A", "B", "C", "D"])["per_gene"]["A"]["ssim"]
            ref = [
                structural_similarity(truth[i, 0], pred[i, 0], win_size=7, data_range=np.ptp(truth[:, 0]))
                for i in range(5)
            ]
            assert whole == pytest.approx(np.mean(ref), abs=1e-6)
    assert m["genes_constant_in_truth"] == ["D"] and m["per_gene"]["D"]["pcc"] is None
    assert m["pcc_gene"] == pytest.approx(np.mean([m["per_gene"][n]["pcc"] for n in "ABC"]), abs=1e-12)
    flat_t = np.moveaxis(truth, 1, -1)[mask].ravel()
    flat_p = np.moveaxis(pred, 1, -1)[mask].ravel()
    assert m["pcc_global"] == pytest.approx(pearsonr(flat_p, flat_t)[0], abs=1e-6)
    assert m["mse"] == pytest.approx(np.mean((flat_p - flat_t) ** 2), abs=1e-9)
    assert m["spearman_global"] == pytest.approx(spearmanr(flat_p, flat_t)[0], abs=1e-6)


def test_a_collapsed_gene_scores_zero_and_is_not_dropped():
    """Four genes; the model predicts gene C as a constant. Dropping C would raise pcc_gene (0.334 -> 0.445 in
    the audit's example); scoring it 0, as Img2ST-Net does, keeps the mean honest."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(6, 4, 32, 32))
    pred = truth * np.array([0.5, 0.4, 0.0, 0.45])[None, :, None, None] + rng.normal(size=truth.shape)
    pred[:, 2] = 0.7  # collapsed
    mask = np.ones((6, 32, 32), bool)
    m = evaluate(pred, truth, mask, np.zeros(4), ["A", "B", "C", "D"])
    live = [pearsonr(pred[:, g].ravel(), truth[:, g].ravel())[0] for g in (0, 1, 3)]
    assert m["per_gene"]["C"]["pcc"] == 0.0 and m["per_gene"]["C"]["spearman"] == 0.0
    assert m["pcc_gene"] == pytest.approx(sum(live) / 4, abs=1e-9)  # C counts, as 0
    assert m["pcc_gene"] < np.mean(live)
    assert m["genes_constant_prediction"] == ["C"] and m["genes_constant_in_truth"] == [] and m["n_genes_scored"] == 4


def _patches(tissue_rows: int, seed: int = 2, tissue_cols: int = 32):
    """Smooth truth on 8 patches of 4 genes, in tissue on the first rows × cols of each patch only."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    truth = ndimage.gaussian_filter(rng.normal(size=(8, 4, 32, 32)), (0, 0, 2, 2))
    truth /= truth.std()
    mask = np.zeros((8, 32, 32), bool)
    mask[:, :tissue_rows, :tissue_cols] = True
    return rng, truth, mask


def test_ssim_counts_only_windows_centred_on_scored_bins():
    """Glass is the training mean in both maps, so its windows used to score ~1: a constant prediction scored 0.41 on
    half-tissue patches and a random one 0.91 on 1/16-tissue patches. Only windows centred on scored bins count."""
    rng, truth, half = _patches(16)
    genes = list("ABCD")
    mean = np.zeros(4)
    constant = np.zeros_like(truth)
    assert abs(evaluate(constant, truth, half, mean, genes)["ssim_st"]) < 0.1
    _, _, corner = _patches(8, tissue_cols=8)  # 1/16 of each patch in tissue
    noise = rng.normal(size=truth.shape)
    assert abs(evaluate(noise, truth, corner, mean, genes)["ssim_st"]) < 0.2
    assert evaluate(truth, truth, corner, mean, genes)["ssim_st"] == pytest.approx(1.0)


def test_a_non_finite_prediction_is_refused_with_run_gene_and_bins():
    _, truth, mask = _patches(16)
    pred = truth.copy()
    pred[0, 2, :3, :4] = np.nan  # 12 scored bins of gene C
    pred[1, 2, 20, 0] = np.nan  # glass: not scored, not counted
    with pytest.raises(FeatcacheError) as e:
        evaluate(pred, truth, mask, np.zeros(4), list("ABCD"), run="enc/frozen fold P2")
    msg = str(e.value)
    assert "enc/frozen fold P2" in msg and "C (12 bins)" in msg and "12 of 4096 scored bins" in msg
    pred[0, 2] = truth[0, 2]
    assert evaluate(pred, truth, mask, np.zeros(4), list("ABCD"))["pcc_gene"] == pytest.approx(1.0)


def test_a_constant_up_to_rounding_scores_zero():
    """The training mean scored at 32 µm came back as a constant with rounding noise (~1e-16 around 0 once
    z-scored) and scored −0.005, the correlation of its rounding errors, instead of 0."""
    from train.metrics import columnwise_pearson

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(500, 3))
    near_zero = 1e-16 * rng.normal(size=500)  # z-scored constant
    float32_constant = (np.float32(5.0) + np.float32(4e-7) * rng.integers(0, 2, 500)).astype(np.float64)  # 1 ulp
    real = 1e-3 * truth[:, 2] + 0.3  # small, but a real signal
    r = columnwise_pearson(np.column_stack([near_zero, float32_constant, real]), truth)
    assert r[0] == 0.0 and r[1] == 0.0
    assert r[2] == pytest.approx(1.0)
