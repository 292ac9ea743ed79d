"""`train decoder`: fit the shared decoder on cached grids for one leave-one-patient-out fold.

Writes ``runs/<dataset>/<encoder>/<mode>/fold-<test sample>/`` (DESIGN §7)::

    config.json        every setting, the seed, the feature store's identity, library versions
    log.jsonl          one line per epoch: train loss, validation loss and pcc_gene, seconds
    train_state.pt     model + optimizer + RNG state after the last finished epoch (resume)
    checkpoint.pt      the selected (best validation pcc_gene) decoder weights
    predictions.zarr   pred, truth, mask (patch, gene, row, col) of the test patient, origins as coords
    metrics.json       test metrics (train/metrics.py), per gene, baselines, noise ceiling when known

The epoch is selected on the validation split (training patients only); the test patient is
scored once, after training. ``mode`` is ``frozen`` (pretrained encoder) or ``random``
(random-init encoder); a decoder other than the UNet is recorded as ``<mode>-<decoder>``, and the
shuffled-target control as ``<mode>-shuffled``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from featcache.errors import FeatcacheError
from featcache.extract import resolve_device
from featcache.prepare import gather_windows
from featcache.progress import progress
from featcache.provenance import library_versions, read_json
from featcache.workspace import Workspace
from featcache.zarrio import consolidate, create_array, write_origins, write_strings
from train.data import Batches, FoldInputs, TargetTransform, blocked_split, load_targets, memory_budget, read_tokens
from train.decoder import build_decoder
from train.metrics import evaluate, per_gene_pearson

MODES = ("frozen", "random", "finetune")


@dataclass
class FoldResult:
    run_dir: Path
    metrics: dict
    reused: bool = False


def store_for(encoder: str, mode: str) -> str:
    return f"{encoder}-random" if mode == "random" else encoder


def run_name(mode: str, decoder: str, control: str | None) -> str:
    name = mode if decoder == "unet" else f"{mode}-{decoder}"
    return f"{name}-{control}" if control else name


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_fold(
    dataset: str,
    encoder: str,
    fold: str,
    mode: str = "frozen",
    decoder: str = "unet",
    epochs: int = 200,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.15,
    in_memory: str = "auto",
    control: str | None = None,
    workspace=None,
    overwrite: bool = False,
    show_progress: bool = True,
    weights: str | None = None,
    encoder_lr: float = 1e-5,
    micro_batch: int | None = None,
    grad_checkpointing: bool = False,
    augment: bool | None = None,
    jitter: float = 0.0,
) -> FoldResult:
    """One fold. ``mode='finetune'`` trains encoder + decoder from image patches (no cache)."""
    if mode not in MODES:
        raise FeatcacheError(f"--mode {mode!r}: use frozen, random or finetune.")
    if control not in (None, "shuffled"):
        raise FeatcacheError(f"--control {control!r}: the only control is 'shuffled'.")
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= val_fraction < 1:
        raise FeatcacheError("--epochs and --batch-size must be ≥ 1, --lr > 0 and 0 ≤ --val-fraction < 1.")
    if in_memory not in ("auto", "yes", "no"):
        raise FeatcacheError(f"--in-memory {in_memory!r}: use auto, yes or no.")
    finetune = mode == "finetune"
    augment = finetune if augment is None else augment
    if augment and not finetune:
        raise FeatcacheError("augmentation applies to image patches: use it with fine-tuning (cached grids are fixed).")
    micro = micro_batch or batch_size
    if micro < 1 or batch_size % micro:
        raise FeatcacheError(f"--micro-batch {micro_batch} must divide --batch-size {batch_size} (gradient accumulation).")
    ws = Workspace.resolve(workspace)
    hint = f"featcache extract --dataset {dataset} --encoder {encoder}" + (" --weights random" if mode == "random" else "")
    inputs = FoldInputs(ws, dataset, None if finetune else store_for(encoder, mode), hint)
    if fold not in inputs.samples:
        raise FeatcacheError(f"--fold {fold!r} is not a sample of dataset {dataset!r} (samples: {', '.join(inputs.samples)}).")
    if len(inputs.samples) < 2:
        raise FeatcacheError(f"dataset {dataset!r} has one sample; leave-one-patient-out needs at least two.")
    dev = resolve_device(device)

    train_samples = [s for s in inputs.samples if s != fold]
    origins = {s: inputs.arrays[s].origin for s in train_samples}
    train_idx, val_idx = blocked_split(origins, val_fraction, seed)
    test_idx = {fold: np.arange(len(inputs.arrays[fold].origin))}
    config = {
        "dataset": dataset, "dataset_fingerprint": inputs.meta["fingerprint"], "encoder": encoder, "mode": mode,
        "run": run_name(mode, decoder, control), "decoder": decoder, "control": control, "fold": fold,
        "train_samples": train_samples, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "Adam",
        "weight_decay": 0.0, "loss": "MSE over in-tissue bins", "seed": seed, "val_fraction": val_fraction,
        "val_split": "spatial blocks of 64×64 bins from the training patients",
        "selection": "epoch with the best validation pcc_gene", "target_transform": "log1p(CP10k), z-score per gene (training patients)",
        "features": {"store": str(inputs.store), "identity": inputs.identity},
        "genes": inputs.genes,
    }
    encoder_model = None
    if finetune:
        from featcache.encoders import get_spec
        from featcache.weights import load_encoder, resolve_weights

        spec = get_spec(encoder)
        source = resolve_weights(spec, weights)
        encoder_model, prov = load_encoder(spec, source)
        config.update({"encoder_weights": source.identity(), "encoder_lr": encoder_lr, "micro_batch": micro,
                       "grad_checkpointing": grad_checkpointing, "augment": "dihedral (8)" if augment else None,
                       "colour_jitter": jitter, "encoder_spec": spec.describe(),
                       "precision": "bf16 autocast on GPU, fp32 on CPU"})
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    config["config_sha256"] = key
    run_dir = ws.run_dir(dataset, encoder, config["run"], fold)
    old = read_json(run_dir / "config.json")
    if old is not None and old.get("config_sha256") != key:
        if not overwrite:
            raise FeatcacheError(f"run folder {run_dir} holds a run with other settings. Pass --overwrite to replace it.")
        shutil.rmtree(run_dir)
        old = None
    if old is not None and (run_dir / "metrics.json").is_file():
        return FoldResult(run_dir, json.loads((run_dir / "metrics.json").read_text()), reused=True)
    ddp = _Distributed(finetune, dev)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config["provenance"] = {"device": str(dev), "libraries": library_versions(), "torch_threads": torch.get_num_threads(),
                                "world_size": ddp.world}
        if old is None:
            (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    ddp.barrier()

    # Target statistics from the training patients (train + validation patches), never the test one.
    transform = TargetTransform.fit(
        load_targets(inputs.arrays[s], np.sort(np.concatenate([train_idx[s], val_idx[s]]))) for s in train_samples
    )
    x0 = inputs.arrays[train_samples[0]].tokens
    per_patch = int(np.prod(x0.shape[1:])) * x0.dtype.itemsize
    n_train = sum(len(i) for i in train_idx.values())
    load = in_memory == "yes" or (in_memory == "auto" and n_train * per_patch < memory_budget())
    train_b = Batches(inputs, train_idx, transform, batch_size, in_memory=load)
    val_b = Batches(inputs, val_idx, transform, batch_size, in_memory=load)
    shuffled_targets = None
    if control == "shuffled":  # break the image ↔ target link: each patch gets another patch's targets
        keys = [(s, int(i)) for s in train_idx for i in train_idx[s]]
        perm = np.random.default_rng([seed, 99]).permutation(len(keys))
        shuffled_targets = {keys[i]: keys[j] for i, j in enumerate(perm)}

    torch.manual_seed(seed)
    if finetune:
        from featcache.encoders import GridEncoder
        from train.finetune import EncoderDecoder

        if grad_checkpointing and hasattr(encoder_model, "set_grad_checkpointing"):
            encoder_model.set_grad_checkpointing(True)
        model = EncoderDecoder(GridEncoder(spec, encoder_model), build_decoder(decoder, spec.dim, len(inputs.genes))).to(dev)
        opt = torch.optim.Adam([{"params": model.encoder.parameters(), "lr": encoder_lr},
                                {"params": model.decoder.parameters(), "lr": lr}], weight_decay=0.0)
    else:
        model = build_decoder(decoder, inputs.channels, len(inputs.genes)).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    step = _Stepper(ddp.wrap(model, dev), opt, dev, micro, augment, jitter, seed)
    n_batches = -(-train_b.n // batch_size)
    usable = n_batches // ddp.world * ddp.world  # every rank takes the same number of steps
    if usable == 0:
        raise FeatcacheError(f"{train_b.n} training patches make fewer batches than there are processes ({ddp.world}).")
    state_path = run_dir / "train_state.pt"
    start, best, log = 0, {"epoch": -1, "val_pcc_gene": -np.inf, "state": None}, []
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, best, log = st["epoch"] + 1, st["best"], st["log"]
        torch.set_rng_state(st["torch_rng"])
        if ddp.main:  # the saved state is the truth: a kill between saving it and logging loses no line
            tmp = run_dir / "log.jsonl.tmp"
            tmp.write_text("".join(json.dumps(row) + "\n" for row in log))
            os.replace(tmp, run_dir / "log.jsonl")

    target_lookup = _target_lookup(train_b) if shuffled_targets else None
    with progress(disable=not (show_progress and ddp.main)) as bar:
        task = bar.add_task(f"{encoder}/{config['run']}/fold-{fold}", total=epochs, completed=start, rate="")
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            model.train()
            losses = []
            for i, (tok, y, m, keys) in enumerate(train_b.epoch(shuffle=True, seed=seed * 100003 + epoch)):
                if i >= usable or i % ddp.world != ddp.rank:
                    continue
                if shuffled_targets:
                    y, m = _swap_targets(keys, shuffled_targets, target_lookup)
                losses.append(step(tok, y, m, epoch, i))
            val_loss, val_pcc = _validate(model, val_b, dev, inputs.genes)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_loss": val_loss,
                   "val_pcc_gene": val_pcc, "seconds": round(time.perf_counter() - t0, 3)}
            log.append(row)
            score = val_pcc if val_pcc is not None and np.isfinite(val_pcc) else -np.inf
            if best["state"] is None or score > best["val_pcc_gene"] or (val_b.n == 0):
                best = {"epoch": epoch, "val_pcc_gene": score, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if ddp.main:
                _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
                              "log": log, "torch_rng": torch.get_rng_state()}, state_path)
                with open(run_dir / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.update(task, advance=1, rate=f"loss {row['train_loss']:.3f} val pcc {val_pcc if val_pcc is not None else float('nan'):.3f}")

    ddp.barrier()
    if not ddp.main:  # the main process scores the test patient and writes the outputs
        ddp.barrier()
        ddp.close()
        return FoldResult(run_dir, {})
    model.load_state_dict(best["state"])
    pred, truth, mask = _predict(model, inputs, fold, test_idx[fold], transform, dev)
    metrics = evaluate(pred, truth, mask, np.zeros(len(inputs.genes)), inputs.genes)
    metrics.update({
        "dataset": dataset, "encoder": encoder, "mode": mode, "run": config["run"], "fold": fold,
        "selected_epoch": best["epoch"], "val_pcc_gene": best["val_pcc_gene"] if np.isfinite(best["val_pcc_gene"]) else None,
        "baselines": {"per_gene_mean": {"mse": float(np.mean(truth.transpose(0, 2, 3, 1)[mask.astype(bool)] ** 2)),
                                        "pcc_gene": 0.0}},
        "noise_ceiling": noise_ceiling(inputs, fold, transform, truth, mask),
        "features_weights": config.get("encoder_weights") or inputs.identity.get("weights"), "config_sha256": key,
    })
    _write_predictions(run_dir / "predictions.zarr", pred, truth, mask, inputs, fold)
    torch.save({"decoder": decoder, "mode": mode, "state_dict": best["state"],
                "c_in": spec.dim if finetune else inputs.channels, "genes": inputs.genes,
                "transform": transform.to_json(), "epoch": best["epoch"], "config_sha256": key}, run_dir / "checkpoint.pt")
    (run_dir / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2))
    state_path.unlink(missing_ok=True)
    ddp.barrier()
    ddp.close()
    return FoldResult(run_dir, metrics)


class _Distributed:
    """torchrun support for fine-tuning: DistributedDataParallel over WORLD_SIZE processes.

    Every rank sees the same shuffled batch order and takes every world-th batch; the main rank
    keeps the log, the training state and the outputs. Without torchrun this is a no-op.
    """

    def __init__(self, finetune: bool, dev):
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if finetune else 1
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.main = self.rank == 0
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
                self.started = True

    def wrap(self, model, dev):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _input(arr: np.ndarray, dev) -> torch.Tensor:
    """Cached grids become float32; uint8 image patches stay uint8 (the encoder normalises them)."""
    x = torch.from_numpy(arr).to(dev, non_blocking=True)
    return x if x.dtype == torch.uint8 else x.float()


def _autocast(dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


class _Stepper:
    """One optimizer step over a batch: micro-batches with gradient accumulation, augmentation,
    bf16 autocast on a GPU. The loss is the masked MSE of the whole batch, whatever the split."""

    def __init__(self, model, opt, dev, micro, augment, jitter, seed):
        self.model, self.opt, self.dev, self.micro = model, opt, dev, micro
        self.augment, self.jitter, self.seed = augment, jitter, seed

    def __call__(self, tok, y, m, epoch, index) -> float:
        from train.finetune import colour_jitter, dihedral

        rng = np.random.default_rng([self.seed, epoch, index])  # the same draws after a resume
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        count = max(float(m.sum()) * y.shape[1], 1.0)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(0, len(tok), self.micro):
            x = _input(tok[a : a + self.micro], self.dev)
            yy = torch.from_numpy(y[a : a + self.micro]).to(self.dev, non_blocking=True)
            mm = torch.from_numpy(m[a : a + self.micro]).to(self.dev, non_blocking=True)
            if self.augment:
                x, yy, mm = dihedral(x, yy, mm, int(rng.integers(4)), bool(rng.integers(2)))
            if self.jitter:
                x = colour_jitter(x, self.jitter, gen)
            with _autocast(self.dev):
                pred = self.model(x)
            loss = ((pred.float() - yy) ** 2 * mm.unsqueeze(1).float()).sum() / count
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        return total


def _validate(model, batches: Batches, dev, genes) -> tuple[float | None, float | None]:
    if batches.n == 0:
        return None, None
    model.eval()
    preds, ys, ms = [], [], []
    with torch.inference_mode(), _autocast(dev):
        for tok, y, m, _ in batches.epoch(shuffle=False):
            preds.append(model(_input(tok, dev)).float().cpu().numpy())
            ys.append(y)
            ms.append(m)
    p, y, m = np.concatenate(preds), np.concatenate(ys), np.concatenate(ms)
    loss = float(np.sum((p - y) ** 2 * m[:, None]) / max(m.sum() * y.shape[1], 1))
    r = per_gene_pearson(p, y, m)
    return loss, float(np.nanmean(r)) if np.isfinite(r).any() else None


def _predict(model, inputs: FoldInputs, sample, idx, transform, dev):
    arr = inputs.arrays[sample]
    model.eval()
    preds = []
    with torch.inference_mode(), _autocast(dev):
        for a in range(0, len(idx), 16):
            tok = read_tokens(arr, sample, idx[a : a + 16])
            preds.append(model(_input(tok, dev)).float().cpu().numpy())
    counts, library, mask = load_targets(arr, idx)
    return np.concatenate(preds), transform(counts, library), mask.astype(bool)


def _target_lookup(batches: Batches) -> dict:
    out = {}
    for unit in batches.units():
        _, y, m, keys = batches._get(unit)
        for k, yy, mm in zip(keys, y, m):
            out[k] = (yy, mm)
    return out


def _swap_targets(keys, mapping, lookup):
    pairs = [lookup[mapping[k]] for k in keys]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def noise_ceiling(inputs: FoldInputs, sample: str, transform: TargetTransform, truth, mask) -> dict | None:
    """Best achievable scores on a synthetic sample: the true rates scored like a prediction."""
    import h5py

    src = Path(inputs.meta["samples"][sample]["source"])  # .../<sample>/outs/binned_outputs/square_008um
    path = src.parents[2] / "synthetic_truth.h5"
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        barcodes = [b.decode() for b in f["barcodes"][()]]
        gene_ids = [g.decode() for g in f["gene_ids"][()]]
        rates = f["rates"][()]
    rr = np.array([int(b[8:13]) for b in barcodes])  # s_008um_RRRRR_CCCCC-1
    cc = np.array([int(b[14:19]) for b in barcodes])
    origins = inputs.arrays[sample].origin.astype(int)
    grid = np.full((max(rr.max(), origins[:, 0].max() + 32) + 1, max(cc.max(), origins[:, 1].max() + 32) + 1), -1)
    grid[rr, cc] = np.arange(len(barcodes))
    row = gather_windows(grid, origins, 32)  # (n, 32, 32) index into rates, -1 where no in-tissue bin
    has = row >= 0
    cols = [gene_ids.index(g) for g in inputs.meta["genes"]["ids"]]
    safe = np.where(has, row, 0)
    panel = np.where(has[..., None], rates[safe][..., cols], 0.0).transpose(0, 3, 1, 2)
    lib = np.where(has, rates.sum(axis=1)[safe], 0.0)
    ceiling = evaluate(transform(panel, lib), truth, mask, np.zeros(len(cols)), inputs.genes)
    ceiling.pop("per_gene")
    return ceiling


def _write_predictions(path: Path, pred, truth, mask, inputs: FoldInputs, sample: str) -> None:
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
    root.attrs.update({"sample": sample, "space": "log1p(CP10k) z-scored with training-patient statistics"})
    n, g = pred.shape[:2]
    dims = ("patch", "gene", "row", "col")
    for name, data in (("pred", pred.astype(np.float32)), ("truth", truth.astype(np.float32))):
        create_array(root, name, shape=data.shape, chunks=(min(n, 32), g, 32, 32), dtype="float32", dims=dims,
                     attributes={"coordinates": "origin gene_id"})[:] = data
    create_array(root, "mask", shape=mask.shape, chunks=(min(n, 32), 32, 32), dtype="bool",
                 dims=("patch", "row", "col"), fill_value=False, attributes={"coordinates": "origin"})[:] = mask
    write_origins(root, inputs.arrays[sample].origin)
    write_strings(root, "gene", inputs.genes, "gene")
    write_strings(root, "gene_id", inputs.meta["genes"]["ids"], "gene")
    consolidate(path)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
