"""``--decoder ridge``: HEST-Benchmark's head on our folds (docs/design.md §5), fitted in closed form.

Per fold, on the training patients only:

1. each patch's **pooled** embedding from the feature store (``pooled``, float32 (patch, channel));
2. **standardised** per channel (scikit-learn ``StandardScaler``) and reduced by **PCA** to
   ``min(256, training patches, channels)`` components (``svd_solver="full"``, exact);
3. **ridge regression** to each patch's **patch-mean target**: the mean over the patch's scored
   bins (in-tissue by default) of the run's target space, every gene at once;
4. **α**: ``--alpha cv`` (default) picks α from :data:`ALPHA_GRID` by inner leave-one-patient-out
   over the training patients (refitting scaler and PCA in every inner fold), scoring each α by
   the mean over inner folds of ``pcc_gene_patch`` on the held-out patient (ties: the larger α);
   with one training patient the inner folds are groups of its 64 × 64-bin blocks
   (:data:`INNER_BLOCKS` folds at most, ``GroupKFold``), and with fewer than two blocks HEST's
   fixed α is used; the record says which. ``--alpha hest`` is HEST-Benchmark exactly:
   α = 100 / (components × genes), ``solver="lsqr"``, ``fit_intercept=False``, ``max_iter=1000``
   (mahmoodlab/HEST ``src/hest/bench/trainer.py`` and ``benchmark.py``). ``--alpha <number>`` fixes α.
   Every other α rule fits an intercept (``solver="cholesky"``): the PCA scores are centred, so the
   coefficients are HEST's and only the per-gene offset differs (no Pearson r changes; mse does).

The test patient is predicted once: the patch's value on every bin of the patch, so the bin metrics
apply; ``pcc_gene_patch`` is HEST's own metric. The fitted scaler, PCA and ridge are written as plain
arrays to ``ridge.npz`` in the run folder (read with ``allow_pickle=False``), with the α grid and the
inner scores, so a run can be reproduced and its predictions recomputed (:func:`predict_pooled`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError
from train.config import SCORE_TEXT, TRANSFORM_TEXT, TrainConfig

N_COMPONENTS = 256  # HEST-Benchmark's latent_dim
ALPHA_GRID = tuple(float(a) for a in 10.0 ** np.arange(-3.0, 6.01, 0.5))  # 1e-3 … 1e6, half-decade steps
INNER_BLOCKS = 5  # inner folds over spatial blocks when the fold has one training patient
BLOCK = 64  # bins per side of those blocks (as the validation split's)
HEST_MAX_ITER = 1000
PARAMS_FILE = "ridge.npz"


def hest_alpha(n_components: int, n_genes: int) -> float:
    """HEST-Benchmark's fixed α: ``100 / (X_train.shape[1] * y_train.shape[1])`` after PCA."""
    return 100.0 / (n_components * n_genes)


def ridge_record(cfg: TrainConfig) -> dict:
    """What config.json says about the ridge head (every setting that shapes the result)."""
    rule = cfg.ridge_alpha
    hest = rule == "hest"
    out = {
        "head": "HEST-Benchmark's: pooled embedding → StandardScaler → PCA → ridge regression to the patch-mean target",
        "features_used": "pooled (the store's per-patch embedding)",
        "pca": {"n_components": f"min({N_COMPONENTS}, training patches, channels)", "svd_solver": "full"},
        "ridge": {
            "alpha": rule if rule in ("cv", "hest") else float(rule),  # 100 and 100.0 are one setting
            "solver": "lsqr" if hest else "cholesky",
            "fit_intercept": not hest,
            **({"max_iter": HEST_MAX_ITER} if hest else {}),
        },
        "patch_target": "mean over the patch's scored bins of the target space",
        "loss": "ridge (squared error + α‖w‖²) on the training patients' patch-mean targets",
        "selection": _selection_text(rule),
        "target_transform": TRANSFORM_TEXT[cfg.target],
        "scored_bins": SCORE_TEXT[cfg.score],
    }
    if rule == "cv":
        out["alpha_grid"] = list(ALPHA_GRID)
    return out


def _selection_text(rule: str) -> str:
    if rule == "hest":
        return "α = 100 / (PCA components × genes), HEST-Benchmark's fixed rule (mahmoodlab/HEST trainer.py)"
    if rule != "cv":
        return f"α fixed at {float(rule):g}"
    return (
        "α from alpha_grid by inner leave-one-patient-out over the training patients (scaler and PCA refitted per "
        "inner fold; score: mean over inner folds of the held-out patient's pcc_gene_patch; ties: the larger α); "
        f"one training patient: inner folds of its {BLOCK}×{BLOCK}-bin blocks (GroupKFold, at most {INNER_BLOCKS}); "
        "fewer than two blocks: HEST's fixed α. The test patient plays no part."
    )


# --------------------------------------------------------------------------- the model
@dataclass
class RidgeFit:
    """A fitted standardise → PCA → ridge pipeline as plain arrays."""

    scaler_mean: np.ndarray  # (channels,)
    scaler_scale: np.ndarray  # (channels,)
    pca_mean: np.ndarray  # (channels,) the PCA's centring (≈ 0 after standardising)
    components: np.ndarray  # (k, channels)
    coef: np.ndarray  # (genes, k)
    intercept: np.ndarray  # (genes,)
    alpha: float
    explained_variance_ratio: np.ndarray  # (k,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict_pooled(self.__dict__, x)


def predict_pooled(params: dict, x: np.ndarray) -> np.ndarray:
    """(patches, genes) from pooled features (patches, channels) with the arrays of :class:`RidgeFit` / ridge.npz."""
    z = (np.asarray(x, np.float64) - params["scaler_mean"]) / params["scaler_scale"]
    scores = (z - params["pca_mean"]) @ params["components"].T
    return scores @ params["coef"].T + params["intercept"]


def _pipeline(x: np.ndarray, seed: int):
    """Standardise and PCA on ``x`` (the training patches): (fitted scaler, fitted PCA, scores)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    k = min(N_COMPONENTS, x.shape[0], x.shape[1])
    pca = PCA(n_components=k, svd_solver="full", random_state=seed)
    return scaler, pca, pca.fit_transform(scaler.transform(x))


def _ridge(alpha: float, hest: bool, seed: int):
    from sklearn.linear_model import Ridge

    if hest:
        return Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=HEST_MAX_ITER, random_state=seed)
    return Ridge(alpha=alpha, solver="cholesky", fit_intercept=True)


def fit(x: np.ndarray, y: np.ndarray, alpha: float, hest: bool, seed: int) -> RidgeFit:
    """Scaler, PCA and ridge fitted on (x, y) of the training patches."""
    scaler, pca, scores = _pipeline(x, seed)
    reg = _ridge(alpha, hest, seed).fit(scores, y)
    intercept = np.broadcast_to(np.asarray(reg.intercept_, np.float64), (y.shape[1],)).copy()
    return RidgeFit(
        scaler.mean_.astype(np.float64),
        scaler.scale_.astype(np.float64),
        pca.mean_.astype(np.float64),
        pca.components_.astype(np.float64),
        np.asarray(reg.coef_, np.float64).reshape(y.shape[1], -1),
        intercept,
        float(alpha),
        pca.explained_variance_ratio_.astype(np.float64),
    )


def _pcc_patch(pred: np.ndarray, truth: np.ndarray) -> float:
    from train.metrics import columnwise_pearson

    r = columnwise_pearson(pred, truth)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def inner_groups(patients: list[str], origins: list[np.ndarray], sections: list[str]) -> tuple[np.ndarray, str]:
    """(inner fold of each training patch, how the folds were made): one per training patient, or, with one
    patient, GroupKFold over its sections' 64 × 64-bin blocks; all -1 when fewer than two groups exist."""
    patient_of = np.concatenate([np.full(len(o), p) for p, o in zip(patients, origins)])
    names = list(dict.fromkeys(patients))
    if len(names) >= 2:
        return np.array([names.index(p) for p in patient_of]), f"leave-one-patient-out over {', '.join(names)}"
    keys = [
        f"{s}:{r // BLOCK}:{c // BLOCK}" for s, o in zip(sections, origins) for r, c in np.asarray(o, np.int64).tolist()
    ]
    unique = list(dict.fromkeys(keys))
    if len(unique) < 2:
        return np.full(len(keys), -1), f"one training patient with {len(unique)} block(s): no inner folds"
    from sklearn.model_selection import GroupKFold

    n = min(INNER_BLOCKS, len(unique))
    fold = np.empty(len(keys), np.int64)
    for i, (_, held) in enumerate(GroupKFold(n_splits=n).split(np.zeros(len(keys)), groups=keys)):
        fold[held] = i
    return fold, f"one training patient ({names[0]}): {n} inner folds of its {len(unique)} {BLOCK}×{BLOCK}-bin blocks"


def choose_alpha(x: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int, grid=ALPHA_GRID) -> dict:
    """α from ``grid`` by the inner folds (``folds`` per patch, -1: none); returns α, the rule and the scores."""
    held_out = [f for f in np.unique(folds) if f >= 0]
    if len(held_out) < 2:
        return {"alpha": None, "scores": None}
    scores = np.full((len(grid), len(held_out)), np.nan)
    for j, f in enumerate(held_out):
        tr, te = folds != f, folds == f
        scaler, pca, s_tr = _pipeline(x[tr], seed)
        s_te = pca.transform(scaler.transform(x[te]))
        for i, a in enumerate(grid):
            scores[i, j] = _pcc_patch(_ridge(a, False, seed).fit(s_tr, y[tr]).predict(s_te), y[te])
    with np.errstate(invalid="ignore"):
        mean = np.array([np.nanmean(row) if np.isfinite(row).any() else -np.inf for row in scores])
    if not np.isfinite(mean).any():
        return {"alpha": None, "scores": scores}
    best = max(range(len(grid)), key=lambda i: (round(float(mean[i]), 12), grid[i]))  # ties: the larger α
    return {"alpha": float(grid[best]), "scores": scores}


# --------------------------------------------------------------------------- the fold
def patch_features(inputs, sample: str) -> np.ndarray:
    """The store's pooled embeddings of one sample (patches, channels), float64, checked finite."""
    pooled = np.asarray(inputs.store.open_sample(sample)["pooled"].values, np.float64)
    if not np.isfinite(pooled).all():
        raise FeatcacheError(
            f"non-finite pooled features in sample {sample} of {inputs.store.loc}: the feature store is damaged; run "
            f"`featcache verify --repair {inputs.store.loc}`, then rerun `featcache extract`."
        )
    return pooled


def fit_ridge_fold(cfg: TrainConfig, record: dict, run, inputs) -> dict:
    """The ridge head's fold: fit on the training patients, predict and score the test patient, write the run folder."""
    from featcache.provenance import library_versions
    from train.data import TargetTransform, fit_targets, load_targets
    from train.run import TestSet, _clean, _score
    from train.scales import patch_means

    t0 = time.perf_counter()
    train = inputs.train_samples(cfg.fold)
    whole = {s: np.arange(len(inputs.arrays[s].origin)) for s in inputs.samples}
    # the training patients' bins, as every head, one section in memory at a time
    transform = TargetTransform.fit((fit_targets(inputs.arrays[s]) for s in train), cfg.target)
    every = cfg.score == "all-bins"
    xs, ys, origins, patients = [], [], [], []
    for s in train:
        counts, library, mask = load_targets(inputs.arrays[s], whole[s])
        scored = np.ones(mask.shape, bool) if every else mask.astype(bool)
        keep = scored.reshape(len(scored), -1).any(axis=1)  # a patch without a scored bin has no patch mean
        xs.append(patch_features(inputs, s)[keep])
        ys.append(patch_means(transform(counts, library), scored)[keep])
        origins.append(inputs.arrays[s].origin[keep])
        patients.append(inputs.dataset.patient_of(s))
    x, y = np.concatenate(xs), np.concatenate(ys)
    rule = cfg.ridge_alpha
    folds, how = inner_groups(patients, origins, train)
    k = min(N_COMPONENTS, x.shape[0], x.shape[1])
    chosen = {"alpha": None, "scores": None}
    if rule == "cv":
        chosen = choose_alpha(x, y, folds, cfg.seed)
    if rule == "hest" or (rule == "cv" and chosen["alpha"] is None):
        alpha, used = hest_alpha(k, y.shape[1]), "hest" if rule == "hest" else "hest (fallback: no inner folds)"
    elif rule == "cv":
        alpha, used = chosen["alpha"], "cv"
    else:
        alpha, used = float(rule), "fixed"
    model = fit(x, y, alpha, rule == "hest", cfg.seed)

    if run.read_config() is None:
        provenance = {"device": "cpu", "libraries": {**library_versions(), "scikit-learn": _sklearn_version()}}
        run.write_config({**record, "provenance": provenance})
    parts = []
    for s in inputs.test_samples(cfg.fold):
        counts, library, mask = load_targets(inputs.arrays[s], whole[s])
        p = model.predict(patch_features(inputs, s)).astype(np.float32)  # (patches, genes)
        pred = np.ascontiguousarray(np.broadcast_to(p[:, :, None, None], counts.shape), dtype=np.float32)
        origin = inputs.arrays[s].origin
        parts.append((pred, transform(counts, library), mask.astype(bool), origin, np.full(len(origin), s)))
    test = TestSet(*(np.concatenate([p[i] for p in parts]) for i in range(5)))
    fold_data = _FoldData(transform, {s: 0 for s in train})
    metrics = _score(cfg, record, inputs, fold_data, _NoEpoch(), test)
    metrics["ridge"] = {
        "alpha": alpha,
        "alpha_rule": used,
        "alpha_grid": list(ALPHA_GRID) if rule == "cv" else None,
        "inner_folds": how if rule == "cv" else None,
        "inner_pcc_gene_patch": None if chosen["scores"] is None else _mean_rows(chosen["scores"]),
        "n_components": int(model.components.shape[0]),
        "explained_variance": float(model.explained_variance_ratio.sum()),
        "n_training_patches": int(len(x)),
        "hest_alpha": hest_alpha(k, y.shape[1]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    attrs = {
        "fold": cfg.fold,
        "samples": inputs.test_samples(cfg.fold),
        "space": TRANSFORM_TEXT[cfg.target],
        "units": "z-scored log1p(CP10k)" if cfg.target == "log1p-cp10k" else "log1p(counts)",
        "scored_bins": SCORE_TEXT[cfg.score],
        "mask": "in-tissue bins",
        "head": "ridge: each patch's predicted patch mean on every bin of the patch",
    }
    genes = inputs.genes
    run.write_predictions(
        test.pred, test.truth, test.mask, test.origins, test.samples, genes, inputs.dataset.gene_ids, attrs
    )
    save_params(run, model, chosen["scores"], record["config_sha256"], transform)
    run.write_metrics(_clean(metrics))
    return metrics


def _mean_rows(scores: np.ndarray) -> list:
    return [float(np.nanmean(r)) if np.isfinite(r).any() else None for r in scores]


def _sklearn_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        return None


@dataclass
class _FoldData:
    """What the shared scoring reads of a fold's data: the target transform and the buffered-out patch counts."""

    transform: object
    buffered: dict


class _NoEpoch:
    """The ridge head has no epochs: no selected epoch, no validation score."""

    epoch = None
    score = float("nan")


def save_params(run, model: RidgeFit, scores, config_sha256: str, transform) -> None:
    """ridge.npz: the fitted arrays, the α grid and inner scores, the target transform and the run's config hash."""
    import io

    from featcache.stores.files import write_bytes

    arrays = {k: np.asarray(v) for k, v in model.__dict__.items()}
    arrays.update(
        {
            "alpha_grid": np.asarray(ALPHA_GRID),
            "inner_scores": np.asarray(scores if scores is not None else np.zeros((0, 0))),
            "target_mean": transform.mean,
            "target_std": transform.std,
            "config_sha256": np.asarray(config_sha256),
        }
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(run.file(PARAMS_FILE), buf.getvalue())


def load_params(run) -> dict:
    """ridge.npz of a finished ridge run, refused unless it records the run's config_sha256 (no pickle is read)."""
    config = run.verified_config()
    path = run.file(PARAMS_FILE)
    if not path.is_file():
        raise FeatcacheError(f"{run.path} has no {PARAMS_FILE}: not a finished ridge run.")
    with np.load(path, allow_pickle=False) as f:
        params = {k: f[k] for k in f.files}
    if str(params["config_sha256"]) != config["config_sha256"]:
        raise FeatcacheError(f"{path} was not fitted with the settings of {run.file('config.json')}.")
    return params
