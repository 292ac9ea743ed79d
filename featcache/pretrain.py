"""The demo's pretrained small encoder: ``python -m featcache.pretrain`` makes the weights the package ships.

No foundation model can be downloaded where the demo runs, so its "frozen" and "fine-tune" modes start
from weights we train ourselves: the demo's small CNN (``tiny-cnn``, a 14 × 14 grid of 96 channels at
448 px) learns, from the H&E patches of a synthetic cohort that shares no patient and no seed with the
demo's, the tissue compartment of each 8 µm bin (the fractions of stroma, tumour, goblet, lumen,
muscle, immune and background that ``synthetic_truth.h5`` records). The task never sees expression: a
1 × 1 head on the token grid, resized to the 32 × 32 bins, is trained with a soft cross-entropy and
then thrown away; only the encoder is kept.

Everything is deterministic on a CPU (fixed seeds, ``torch.use_deterministic_algorithms(True)``, a
fixed thread count), so running the script again with the recorded settings rebuilds the file byte
for byte on the same kind of machine. The weights are stored in float16 (0.75 MB instead of 1.5 MB);
``featcache/data/<encoder>-demo.json`` records the settings, what the cohort was, the training
curve, the machine and the sha256 of the file, and the sha256 of the ``--quick`` rebuild the test
suite repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from featcache.encoders import GridEncoder, build_model, get_spec
from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, gather_windows
from featcache.provenance import library_versions

DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED = {"tiny-cnn": "tiny-cnn-demo"}  # encoder -> stem of its shipped weights (.safetensors) and record (.json)


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting that shapes the weights; the record holds them, and the same settings rebuild the file."""

    encoder: str = "tiny-cnn"
    # the cohort: its own seed and patient names, none of them the demo's (pipeline.DEMO_SAMPLES, seed 0...)
    cohort_seed: int = 7919
    patients: tuple[str, ...] = ("PT-A", "PT-B", "PT-C", "PT-D")
    held_out: str = "PT-D"  # scored after training (compartment accuracy), never trained on
    rows: int = 128
    cols: int = 160
    n_genes: int = 61  # the named marker programmes only: the targets are not read
    stride: int = 16  # bins between patch origins (overlapping patches: more views of the same tissue)
    # the training
    seed: int = 0  # weight initialisation, batch order and augmentation draws
    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-3  # Adam, cosine decay to 5 % over the run
    threads: int = 2
    dtype: str = "float16"  # of the shipped tensors (the running counters stay int64)

    def quick(self) -> PretrainConfig:
        """The reduced rebuild the test suite repeats: two small sections, one epoch."""
        return replace(self, patients=("PT-A", "PT-D"), rows=64, cols=96, stride=32, epochs=1, batch_size=4)


DEFAULT = PretrainConfig()


def shipped_weights(encoder: str) -> Path | None:
    """The weights this package ships for ``encoder`` (made by this module), or None."""
    stem = SHIPPED.get(encoder)
    path = DATA_DIR / f"{stem}.safetensors" if stem else None
    return path if path is not None and path.is_file() else None


def shipped_record(encoder: str) -> dict | None:
    stem = SHIPPED.get(encoder)
    path = DATA_DIR / f"{stem}.json" if stem else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


# --------------------------------------------------------------------------- the cohort
def synthesize_cohort(cfg: PretrainConfig, root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Synthesize and prepare the cohort under ``root``: per patient, uint8 patches (n, 448, 448, 3) and the
    compartment fractions of their bins (n, compartments, 32, 32); bins outside the tissue count as background."""
    from featcache.prepare import prepare_dataset
    from featcache.stores import Workspace
    from featcache.synth import SynthConfig, synthesize

    raw = root / "raw"
    synthesize(
        raw, list(cfg.patients), SynthConfig(rows=cfg.rows, cols=cfg.cols, n_genes=cfg.n_genes, seed=cfg.cohort_seed)
    )
    prepare_dataset(
        "pretrain",
        {p: str(raw / p) for p in cfg.patients},
        stride=cfg.stride,
        workspace=root / "ws",
        show_progress=False,
        workers=1,
    )
    ds = Workspace.resolve(root / "ws").open_dataset("pretrain")
    images, labels = {}, {}
    for p in cfg.patients:
        images[p] = np.asarray(ds.image_array(p)[:])
        labels[p] = _compartment_windows(raw / p / "synthetic_truth.h5", cfg, ds.origins(p))
    return images, labels


def _compartment_windows(truth: Path, cfg: PretrainConfig, origins: np.ndarray) -> np.ndarray:
    import h5py

    from featcache.synth import BG

    with h5py.File(truth, "r") as f:
        barcodes = [b.decode() for b in f["barcodes"][:]]
        fractions = f["compartment_fractions"][:].astype(np.float32)
    grid = np.zeros((cfg.rows, cfg.cols, fractions.shape[1]), np.float32)
    grid[..., BG] = 1.0
    rows = np.array([int(b.split("_")[2]) for b in barcodes])
    cols = np.array([int(b.split("_")[3].split("-")[0]) for b in barcodes])
    grid[rows, cols] = fractions
    return np.ascontiguousarray(gather_windows(grid, origins).transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- training
class _Deterministic:
    """Seeds, deterministic algorithms and the thread count for the build; the caller's settings come back after."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def __enter__(self):
        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
        torch.set_num_threads(self.cfg.threads)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.cfg.seed)
        return self

    def __exit__(self, *_):
        threads, deterministic, rng = self.saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    size = target.shape[-2:]
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return -(target * torch.log_softmax(up, dim=1)).sum(dim=1).mean()


def _accuracy(enc, head, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of in-tissue bins whose largest predicted compartment is their largest true one."""
    from featcache.synth import BG

    enc.eval()
    hits = total = 0
    with torch.inference_mode():
        for a in range(0, len(images), 8):
            tokens, _ = enc(torch.from_numpy(images[a : a + 8]))
            logits = head(tokens.permute(0, 3, 1, 2))
            up = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            truth = torch.from_numpy(labels[a : a + 8])
            tissue = truth[:, BG] < 0.5
            hits += int(((up.argmax(1) == truth.argmax(1)) & tissue).sum())
            total += int(tissue.sum())
    return hits / max(total, 1)


def train_encoder(cfg: PretrainConfig, images: dict, labels: dict, on_epoch=None) -> tuple[dict, list[dict]]:
    """The encoder's state dict (float32) after training on every patient but ``held_out``, and the log."""
    spec = get_spec(cfg.encoder)
    train = [p for p in cfg.patients if p != cfg.held_out]
    x = np.concatenate([images[p] for p in train])
    y = np.concatenate([labels[p] for p in train])
    net = build_model(spec)
    enc = GridEncoder(spec, net)
    head = torch.nn.Conv2d(spec.dim, y.shape[1], 1)  # discarded after training
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng = np.random.default_rng([cfg.seed, 11])
    log = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        enc.train()
        losses = []
        order = rng.permutation(len(x))
        for a in range(0, len(x), cfg.batch_size):
            idx = np.sort(order[a : a + cfg.batch_size])
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            if flip:  # the image (B, H, W, C) and the bins (B, K, R, C) turn together
                xb, yb = xb.flip(2), yb.flip(3)
            xb, yb = torch.rot90(xb, k, dims=(1, 2)), torch.rot90(yb, k, dims=(2, 3))
            tokens, _ = enc(xb.contiguous())
            loss = _soft_cross_entropy(head(tokens.permute(0, 3, 1, 2)), yb.contiguous())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5)}
        if cfg.held_out in images:
            row[f"accuracy_{cfg.held_out}"] = round(_accuracy(enc, head, images[cfg.held_out], labels[cfg.held_out]), 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log.append(row)
        if on_epoch:
            on_epoch(row)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, log


def to_shipped(state: dict, dtype: str) -> dict:
    """Floating tensors in the shipped dtype, contiguous; integer counters as they are."""
    cast = getattr(torch, dtype)
    return {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def build(cfg: PretrainConfig, out: Path, workdir: Path | None = None, on_step=None) -> dict:
    """Synthesize the cohort, train, write ``out`` (safetensors); returns what the record says about the run."""
    from safetensors.torch import save_file

    from featcache.weights import sha256_file

    say = on_step or (lambda line: None)
    if cfg.held_out not in cfg.patients or len(cfg.patients) < 2:
        raise FeatcacheError("the pretraining cohort needs at least two patients, one of them held out.")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-pretrain-") as tmp:
        root = Path(workdir or tmp)
        images, labels = synthesize_cohort(cfg, root)
        say(f"cohort: {', '.join(f'{p} {len(v)}' for p, v in images.items())} patches (seed {cfg.cohort_seed})")
        t1 = time.perf_counter()
        with _Deterministic(cfg):
            state, log = train_encoder(cfg, images, labels, on_epoch=lambda r: say(json.dumps(r)))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_shipped(state, cfg.dtype), str(out))
    return {
        "file": out.name,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        "patches": {p: int(len(v)) for p, v in images.items()},
        "log": log,
        "seconds": {"cohort": round(t1 - t0, 1), "training": round(time.perf_counter() - t1, 1)},
    }


def record(cfg: PretrainConfig, full: dict, quick: dict | None) -> dict:
    """The JSON beside the weights: settings, task, machine, the file's sha256 and the quick rebuild's."""
    spec = get_spec(cfg.encoder)
    return {
        "encoder": spec.describe(),
        "script": "python -m featcache.pretrain (featcache/pretrain.py)",
        "settings": asdict(cfg),
        "task": "per-bin tissue compartment fractions (synthetic_truth.h5 compartment_fractions; bins outside the "
        "tissue count as background) from the 448 px H&E patch, through a 1×1 head on the token grid resized "
        "bilinearly to 32×32 bins, soft cross-entropy; the head is discarded. Expression is never read.",
        "augmentation": "one random dihedral transform (rotation by k·90°, mirror) per batch, image and bins alike",
        "cohort": {
            "generator": "featcache.synth",
            "seed": cfg.cohort_seed,
            "patients": list(cfg.patients),
            "trained_on": [p for p in cfg.patients if p != cfg.held_out],
            "held_out": cfg.held_out,
            "grid_bins": [cfg.rows, cfg.cols],
            "stride_bins": cfg.stride,
            "patch_px": GEOMETRY.patch_px,
        },
        "weights": full,
        "quick_rebuild": None if quick is None else {"settings": asdict(cfg.quick()), **quick},
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": cfg.threads,
            "load_average_1min": round(os.getloadavg()[0], 1),  # the seconds above are wall time on a shared machine
        },
        "libraries": library_versions(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m featcache.pretrain", description="Pretrain the demo's small encoder (see the module text)."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="weights file [default: featcache/data/<stem>.safetensors]"
    )
    parser.add_argument("--quick", action="store_true", help="only the reduced rebuild (prints its sha256)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cohort here [default: a temporary folder]")
    args = parser.parse_args(argv)
    cfg = DEFAULT
    if args.quick:
        out = args.out or Path(tempfile.mkdtemp()) / "quick.safetensors"
        print(json.dumps(build(cfg.quick(), out, args.workdir, print), indent=1))
        return
    out = args.out or DATA_DIR / f"{SHIPPED[cfg.encoder]}.safetensors"
    full = build(cfg, out, args.workdir, print)
    with tempfile.TemporaryDirectory() as tmp:
        quick = build(cfg.quick(), Path(tmp) / "quick.safetensors")
    quick = {k: quick[k] for k in ("sha256", "bytes", "patches")}
    out.with_suffix(".json").write_text(json.dumps(record(cfg, full, quick), indent=2) + "\n")
    print(f"wrote {out} ({full['bytes']} bytes, sha256 {full['sha256']}) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
