"""One leave-one-patient-out fold: `train decoder` (cached grids) and `train finetune` (end to end).

:func:`train_fold` reads top to bottom: inputs, run folder, data, model, loop, selection, test,
write. The run folder's format belongs to featcache/stores/runs.py; the settings to
:class:`~train.config.TrainConfig`. The epoch is selected on the validation split (training
patients only); the test patient is scored once, after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, BinSums
from featcache.provenance import library_versions
from featcache.stores import Workspace
from train.ceiling import noise_ceiling
from train.config import MAPPING_TEXT, SCORE_TEXT, TRANSFORM_TEXT, TrainConfig
from train.data import Batches, FoldInputs, TargetTransform, blocked_split, fit_targets, memory_budget
from train.loop import Distributed, Stepper, fit, predict
from train.losses import CountStats, count_head, dispersion, objective, pack
from train.metrics import evaluate
from train.model import assemble
from train.scales import test_scale_scores


@dataclass
class FoldResult:
    run_dir: Path
    metrics: dict
    reused: bool = False


def train_fold(
    cfg: TrainConfig,
    workspace=None,
    *,
    device: str = "auto",
    in_memory: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
    tensorboard: bool = False,
) -> FoldResult:
    """Train and score one fold; an unfinished run with the same settings resumes, a finished one is reused."""
    cfg.validate()
    if in_memory not in ("auto", "yes", "no"):
        raise FeatcacheError(f"--in-memory {in_memory!r}: use auto, yes or no.")
    ws = Workspace.resolve(workspace)
    inputs, encoder, record = _inputs(ws, cfg)
    run = ws.run(cfg.dataset, cfg.encoder, cfg.run_name, cfg.fold, cfg.seed, cfg.trial_lr)
    with run.writer(take=Distributed.is_main(cfg.finetune)):  # one writer per run folder; under torchrun, rank 0
        return _train_held(cfg, run, inputs, encoder, record, device, in_memory, overwrite, show_progress, tensorboard)


def _train_held(
    cfg: TrainConfig, run, inputs, encoder, record, device, in_memory, overwrite, show_progress, tensorboard
):
    """The fold in its run folder, which this process holds: reuse, resume or start; train, test and write."""
    hint = f", or --name NAME to train a variant beside it (runs/{cfg.dataset}/{cfg.encoder}/{cfg.run_name}-NAME/)"
    state = run.claim(record, overwrite, hint)
    if state == "done":
        return FoldResult(run.path, run.read_metrics(), reused=True)
    if cfg.ridge:  # HEST-Benchmark's head: closed form, no epochs (train/ridge.py)
        from train.ridge import fit_ridge_fold

        return FoldResult(run.path, fit_ridge_fold(cfg, record, run, inputs))
    if state == "resume":
        run.verified_config()  # a config.json edited since it was written is not resumed into
    dev = resolve_device(device)
    ddp = Distributed(cfg.finetune, dev)
    data = FoldData(inputs, cfg, in_memory, ddp.world)
    torch.manual_seed(cfg.seed)
    model, opt = _build(cfg, inputs, encoder, dev, data.counts)
    if ddp.main and run.read_config() is None:  # written only once the run can start
        provenance = {"device": str(dev), "libraries": library_versions(), "world_size": ddp.world}
        run.write_config({**record, "provenance": {**provenance, "torch_threads": torch.get_num_threads()}})
    ddp.barrier()
    step = Stepper(ddp.wrap(model, dev), opt, dev, cfg, objective(cfg, data.transform, model))
    best = fit(model, opt, step, cfg, run, ddp, data.train, data.val, dev, data.targets_for, show_progress, tensorboard)

    ddp.barrier()
    metrics = _test_and_write(cfg, record, run, data, model, best, encoder, dev) if ddp.main else {}
    ddp.barrier()
    ddp.close()
    return FoldResult(run.path, metrics)


def _inputs(ws: Workspace, cfg: TrainConfig):
    """The fold's checked inputs, the fine-tune encoder (or None) and the config.json record."""
    ds = ws.open_dataset(cfg.dataset)
    random = cfg.mode == "random"
    store = None if cfg.finetune else ws.feature_store(cfg.dataset, cfg.encoder, random, cfg.seed if random else 0)
    inputs = FoldInputs(ds, store, cfg.layer, _encoder_px_per_bin(cfg.encoder) if cfg.finetune else GEOMETRY.px_per_bin)
    if store is not None:
        check_store_mode(cfg, store, inputs.identity)
    inputs.check_fold(cfg.fold)
    encoder = _finetune_encoder(cfg) if cfg.finetune else None
    return inputs, encoder, cfg.record(_input_identity(cfg, inputs, encoder))


def check_store_mode(cfg: TrainConfig, store, identity: dict) -> None:
    """A run is what its store holds (docs/design.md §7): random weights (``random:<seed>``) train only as the
    random-init mode, with the run's own seed; pretrained weights only as frozen."""
    weights = str(identity.get("weights"))
    base = identity.get("encoder", cfg.encoder)
    if cfg.mode == "frozen" and weights.startswith("random:"):
        seed = weights.split(":", 1)[1]
        raise FeatcacheError(
            f"feature store {store.name!r} holds random-init features ({weights}), not pretrained ones: training it "
            f"as 'frozen' would report a random-init result as frozen. Train the random-init mode with "
            f"`train decoder --dataset {cfg.dataset} --encoder {base} --mode random --seed {seed} --fold {cfg.fold}`."
        )
    if cfg.mode == "random" and weights != f"random:{cfg.seed}":
        raise FeatcacheError(
            f"feature store {store.name!r} holds {weights} features, but a seed-{cfg.seed} random-init run reads "
            f"random:{cfg.seed} ones (the random encoder is drawn per seed). Make them with "
            f"`featcache extract --dataset {cfg.dataset} --encoder {cfg.encoder} --weights random:{cfg.seed} "
            + (f"--layers {cfg.layer} " if cfg.layer is not None else "")
            + "--overwrite` (`train loocv` extracts missing ones itself)."
        )


class FoldData:
    """The fold's split (a spatially blocked validation split of the training patients), the target
    transform fitted on the training patients only, and the training and validation batches."""

    def __init__(self, inputs: FoldInputs, cfg: TrainConfig, in_memory: str, world: int):
        self.inputs = inputs
        samples = inputs.train_samples(cfg.fold)
        self.train_idx, self.val_idx = blocked_split(
            {s: inputs.arrays[s].origin for s in samples}, cfg.val_fraction, cfg.seed
        )
        # every bin of the training patients once, whatever the split: a fold's stored truth is the same for every seed
        whole = {s: np.arange(len(inputs.arrays[s].origin)) for s in samples}
        parts = (fit_targets(inputs.arrays[s]) for s in samples)
        self.counts = None if cfg.loss == "mse" else CountStats()  # a count loss's offsets, in the same pass
        self.transform = TargetTransform.fit(parts if self.counts is None else self.counts.observe(parts), cfg.target)
        targets = self.transform if self.counts is None else pack  # a count loss trains on the raw counts
        self.buffered = {s: len(whole[s]) - len(self.train_idx[s]) - len(self.val_idx[s]) for s in samples}
        load = in_memory == "yes" or (in_memory == "auto" and _training_bytes(inputs, self.train_idx) < memory_budget())
        every = cfg.score == "all-bins"
        self.train = Batches(inputs, self.train_idx, targets, cfg.batch_size, in_memory=load, all_bins=every)
        self.val = Batches(inputs, self.val_idx, targets, cfg.batch_size, in_memory=load, all_bins=every)
        if self.train.n == 0:
            raise FeatcacheError(
                f"the training patients' {sum(len(v) for v in whole.values())} patches leave none for training once "
                f"the validation region (--val-fraction {cfg.val_fraction}) and its one-patch buffer are set aside; "
                "lower --val-fraction (0 turns validation off and keeps the last epoch)."
            )
        if -(-self.train.n // cfg.batch_size) < world:
            raise FeatcacheError(
                f"{self.train.n} training patches make fewer batches than there are processes ({world})."
            )
        self.targets_for = (
            _shuffled_targets(self.train, self.train_idx, cfg.seed) if cfg.control == "shuffled" else None
        )


@dataclass
class TestSet:
    """The test patient's patches, all its sections in one: predictions, truth, mask, origins, samples."""

    pred: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    origins: np.ndarray
    samples: np.ndarray  # the section each patch comes from
    log_rate: np.ndarray | None = None  # a count model's output: log expected counts per 10k UMIs

    @classmethod
    def predict(cls, model, inputs: FoldInputs, fold: str, transform, dev, objective=None) -> TestSet:
        parts, raw = [], objective is not None and objective.kind != "mse"
        for s in inputs.test_samples(fold):
            idx = np.arange(len(inputs.arrays[s].origin))
            pred, truth, mask, *out = predict(model, inputs, s, idx, transform, dev, objective, raw=raw)
            parts.append((pred, truth, mask, inputs.arrays[s].origin, np.full(len(idx), s), *out))
        return cls(*(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))))

    def scored(self, all_bins: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pred, truth, mask of the bins each point metric counts, mask for SSIM's maps).

        Where patches overlap (stride < 32) each bin is scored once: its predictions are averaged
        over the patches that hold it (:class:`~featcache.geometry.BinSums`, the average
        ``analysis.stitch`` draws), and it counts in the point metrics in its first patch only; SSIM
        compares each patch's 32 × 32 map of averaged values.
        """
        scoring = np.ones(self.mask.shape, bool) if all_bins else self.mask
        pred, first = np.empty_like(self.pred), scoring.copy()
        for s in np.unique(self.samples):
            k = np.flatnonzero(self.samples == s)
            sums = BinSums(self.origins[k], self.pred[k])
            pred[k] = sums.patch_maps(self.pred.dtype)
            first[k] &= sums.first()
        return pred, self.truth, first, scoring


def _test_and_write(cfg: TrainConfig, record: dict, run, data: FoldData, model, best, encoder, dev) -> dict:
    """Score the test patient once with the selected epoch's weights; write predictions, checkpoint, metrics."""
    inputs = data.inputs
    model.load_state_dict(best.state)
    test = TestSet.predict(model, inputs, cfg.fold, data.transform, dev, objective(cfg, data.transform, model))
    metrics = _score(cfg, record, inputs, data, best, test)
    if cfg.loss == "nb":
        metrics["nb_theta"] = dispersion(model, inputs.genes)  # the selected epoch's learned size θ per gene
    units = "z-scored log1p(CP10k)" if cfg.target == "log1p-cp10k" else "log1p(counts)"
    attrs = {
        "fold": cfg.fold,
        "samples": inputs.test_samples(cfg.fold),
        "space": TRANSFORM_TEXT[cfg.target],
        "units": units,
        "scored_bins": SCORE_TEXT[cfg.score],
        "mask": "in-tissue bins",
    }
    if cfg.loss != "mse":
        attrs.update(
            {
                "loss": cfg.loss,
                "pred_from": f"log_rate (log expected counts per 10k UMIs) of the {cfg.loss} model: "
                + MAPPING_TEXT[cfg.target],
            }
        )
    extra = None if test.log_rate is None else {"log_rate": test.log_rate}  # pred is its target-space mapping
    run.write_predictions(
        test.pred,
        test.truth,
        test.mask,
        test.origins,
        test.samples,
        inputs.genes,
        inputs.dataset.gene_ids,
        attrs,
        extra,
    )
    run.save_checkpoint(
        {
            "decoder": cfg.decoder,
            "mode": cfg.mode,
            "state_dict": best.state,
            "c_in": _c_in(inputs, encoder),
            "genes": inputs.genes,
            "transform": data.transform.to_json(),
            "epoch": best.epoch,
            "config_sha256": record["config_sha256"],
            **({} if data.counts is None else {"loss": cfg.loss, "counts": data.counts.to_json()}),
        }
    )
    run.write_metrics(_clean(metrics))
    run.clear_state()
    return metrics


def _finetune_encoder(cfg: TrainConfig):
    """(spec, network with its weights, weights source) of the encoder a fine-tune run starts from."""
    from featcache.encoders import get_spec
    from featcache.weights import load_encoder, resolve_weights

    spec = get_spec(cfg.encoder)
    source = resolve_weights(spec, cfg.weights_spec)
    model, _ = load_encoder(spec, source)
    return spec, model, source


def _encoder_px_per_bin(name: str) -> int:
    from featcache.encoders import get_spec

    return get_spec(name).px_per_bin


def _input_identity(cfg: TrainConfig, inputs: FoldInputs, encoder) -> dict:
    """What the run reads, by identity (never by path, so a workspace can move)."""
    out = {
        "dataset_fingerprint": inputs.dataset.fingerprint,
        "train_samples": inputs.train_samples(cfg.fold),
        "test_samples": inputs.test_samples(cfg.fold),
        "features": {"store": inputs.store.name if inputs.store else None, "identity": inputs.identity},
        "patching": {  # px_per_bin: the rendering the encoder read (predict renders a new slide at it)
            **{
                k: inputs.meta["geometry"].get(k) for k in ("stride_bins", "min_tissue", "px_per_bin", "bins_per_patch")
            },
            "px_per_bin": inputs.px_per_bin,
        },
        "genes": inputs.genes,
        "gene_ids": inputs.dataset.gene_ids,
    }
    if encoder is not None:
        spec, _, source = encoder
        out.update({"encoder_weights": source.identity(), "encoder_spec": spec.describe()})
    return out


def _c_in(inputs: FoldInputs, encoder) -> int:
    return encoder[0].dim if encoder is not None else inputs.channels


def _training_bytes(inputs: FoldInputs, train_idx: dict) -> int:
    x0 = next(iter(inputs.arrays.values())).tokens
    return sum(len(i) for i in train_idx.values()) * int(np.prod(x0.shape[1:])) * x0.dtype.itemsize


def _build(cfg: TrainConfig, inputs: FoldInputs, encoder, dev, counts=None):
    """The decoder (or encoder + decoder) and its Adam optimizer, no weight decay; a count loss's head starts at
    the training patients' per-gene rates, its NB dispersion learns at ``dispersion_lr``."""
    grid = None
    if encoder is not None:
        from featcache.encoders import GridEncoder

        spec, net, _ = encoder
        if cfg.grad_checkpointing and hasattr(net, "set_grad_checkpointing"):
            net.set_grad_checkpointing(True)
        grid = GridEncoder(spec, net)
    model = assemble(cfg.decoder, _c_in(inputs, encoder), len(inputs.genes), grid, loss=cfg.loss)
    head = count_head(model)
    if head is not None:
        head.log_base.copy_(torch.from_numpy(counts.log_base))
        head.median_library.fill_(counts.median_library)
    model = model.to(dev)
    decoder = model if grid is None else model.decoder
    theta = [] if head is None or head.log_theta is None else [head.log_theta]
    groups = [{"params": [p for p in decoder.parameters() if all(p is not t for t in theta)], "lr": cfg.lr}]
    if grid is not None:
        groups.insert(0, {"params": model.encoder.parameters(), "lr": cfg.encoder_lr})
    if theta:
        groups.append({"params": theta, "lr": cfg.dispersion_lr})
    if grid is None and not theta:
        return model, torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    return model, torch.optim.Adam(groups, weight_decay=0.0)


def _shuffled_targets(batches: Batches, train_idx: dict, seed: int):
    """The shuffled-target control: each training patch gets another training patch's targets."""
    keys = [(s, int(i)) for s in train_idx for i in train_idx[s]]
    perm = np.random.default_rng([seed, 99]).permutation(len(keys))
    mapping = {keys[i]: keys[j] for i, j in enumerate(perm)}
    lookup = {}
    for unit in batches.units():
        _, y, m, unit_keys = batches._get(unit)
        lookup.update({k: (yy, mm) for k, yy, mm in zip(unit_keys, y, m)})

    def targets_for(batch_keys):
        pairs = [lookup[mapping[k]] for k in batch_keys]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    return targets_for


def _score(cfg: TrainConfig, record: dict, inputs: FoldInputs, data: FoldData, best, test: TestSet) -> dict:
    pred, truth, points, maps = test.scored(cfg.score == "all-bins")
    mean = data.transform.target_mean
    name = f"run {cfg.dataset}/{cfg.encoder}/{cfg.run_name} fold {cfg.fold}"
    metrics = evaluate(pred, truth, points, mean, inputs.genes, ssim_mask=maps, run=name)
    metrics.update(test_scale_scores(inputs, test, data.transform, cfg.score == "all-bins"))  # train/scales.py
    ceiling = noise_ceiling(inputs, test, data.transform, points, maps)
    # the floor: every metric of predicting each gene's training mean everywhere
    constant = np.broadcast_to(mean.astype(pred.dtype)[None, :, None, None], pred.shape)  # test.pred's shape too
    floor = evaluate(constant, truth, points, mean, inputs.genes, ssim_mask=maps)
    floor = {k: floor[k] for k in ("pcc_gene", "pcc_global", "spearman_gene", "spearman_global", "mse", "ssim_st")}
    coarse = test_scale_scores(inputs, test, data.transform, cfg.score == "all-bins", pred=constant)
    floor.update({k: coarse[k] for k in ("pcc_gene_patch", "pcc_gene_16um", "pcc_gene_32um")})
    metrics.update(
        {
            "dataset": cfg.dataset,
            "encoder": cfg.encoder,
            "mode": cfg.mode,
            "run": cfg.run_name,
            "fold": cfg.fold,
            "test_samples": inputs.test_samples(cfg.fold),
            "selected_epoch": best.epoch,
            "val_pcc_gene": best.score if np.isfinite(best.score) else None,
            "training_patches_buffered_out": data.buffered,
            "baselines": {"per_gene_mean": floor},
            "noise_ceiling": ceiling,
            "features_weights": record.get("encoder_weights") or inputs.identity.get("weights"),
            "config_sha256": record["config_sha256"],
        }
    )
    return metrics


def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
