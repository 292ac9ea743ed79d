"""Work that spans the stages: the demo (synth → prepare → extract → LOOCV → figures), a LOOCV
that extracts missing random-init features on the way, and ``predict`` (pipeline/predict.py:
a trained run applied to new slides).

This package is the one place that composes the stages; the stages themselves only share the
store layer, the encoder registry and the helpers in featcache (errors, geometry, device,
streams, the slide reader). The command lines print what these functions return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.stores import Workspace

DEMO_SAMPLES = ("P1", "P2", "P5")
# The demo's fine-tuning: the decoder's steps as in the frozen run (same lr, batch, epochs, no augmentation, one
# forward pass per batch so BatchNorm sees the frozen run's batches) and the encoder moving 10× more slowly.
FINETUNE_BUDGET = {"encoder_lr": 1e-4, "micro_batch": 8, "augment": False}


def loocv(
    dataset: str,
    encoders: list[str],
    modes: list[str],
    options: dict | None = None,
    *,
    workspace=None,
    device: str = "auto",
    show_progress: bool = True,
    **runtime,
) -> dict:
    """`train loocv`: random-init features are extracted (``random:<seed>`` for each seed) when missing, then every
    fold by :func:`train.loocv.run_loocv` (``runtime``: its ``in_memory``, ``overwrite``; ``jobs``, ``scheduler`` and
    ``slurm`` say where the folds run, train/cluster.py: the cluster is reached before anything is written)."""
    from train.cluster import FoldRunner
    from train.config import TrainConfig
    from train.loocv import run_loocv

    ws = Workspace.resolve(workspace)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    seeds = options.get("seeds") or [options.get("seed", TrainConfig.seed)]
    where = {k: runtime.pop(k) for k in ("jobs", "scheduler", "slurm") if k in runtime}
    with FoldRunner(**where, device=device) as runner:
        if "random" in modes:
            random_stores(dataset, encoders, seeds, options.get("layer"), ws, device, show_progress)
        return run_loocv(
            dataset,
            encoders,
            modes,
            options,
            workspace=ws,
            device=device,
            show_progress=show_progress,
            runner=runner,
            **runtime,
        )


def random_stores(dataset, encoders, seeds, layer, workspace, device: str = "auto", show_progress: bool = True):
    """Extract the random-init feature stores that random-mode runs of these seeds read and that are missing:
    random-init features are drawn per seed (``random:<seed>``, store <encoder>-random[-s<seed>])."""
    from featcache.extract import ExtractionConfig, extract

    ws = Workspace.resolve(workspace)
    ws.open_dataset(dataset)
    for e in encoders:
        for seed in seeds:
            if not ws.feature_store(dataset, e, random=True, seed=seed).exists():
                layers = (layer,) if layer else ()  # the run's layer too
                config = ExtractionConfig(e, weights=f"random:{seed}", layers=layers)
                extract(dataset, config, workspace=ws, device=device, show_progress=show_progress)


@dataclass
class DemoResult:
    seconds: float
    comparison: dict
    places: dict[str, Path] = field(default_factory=dict)  # what lives where


def demo(
    workspace=None,
    seed: int = 0,
    encoder: str = "tiny-cnn",
    weights: str | None = None,
    epochs: int = 15,
    finetune_epochs: int = 15,
    on_step=None,
    n_seeds: int = 2,
) -> DemoResult:
    """The whole pipeline on a small synthetic 3-patient dataset; ``on_step(line)`` hears each finished step.

    Every run is trained with ``n_seeds`` training seeds (``seed``, ``seed + 1``, ...), each its own run folder and,
    for random-init, its own random encoder."""
    from analysis.compare import paired_comparison
    from analysis.figures import draw_all
    from featcache.encoders import get_spec
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    from featcache.pretrain import shipped_weights
    from featcache.synth import SynthConfig, synthesize
    from train.summary import run_key

    t0 = time.perf_counter()
    say = on_step or (lambda line: None)
    ws = Workspace.resolve(workspace)
    spec = get_spec(encoder)
    if epochs < 1 or finetune_epochs < 1 or n_seeds < 1:
        raise FeatcacheError("--epochs, --finetune-epochs and --n-seeds must be at least 1.")
    seeds = list(range(seed, seed + n_seeds))
    shipped = shipped_weights(encoder) if weights is None else None  # featcache's own pretrained weights
    note = _pretrained_note(encoder, seed) if shipped is not None else None  # refuses the pretraining cohort's seed
    raw = ws.raw_dir(f"demo-seed{seed}")
    missing = [n for n in DEMO_SAMPLES if not (raw / n / "outs").is_dir()]
    if missing:
        say(f"synthesizing {len(missing)} Visium HD samples into {raw} ...")
        synthesize(raw, missing, SynthConfig(seed=seed))
    res = prepare_dataset("demo", {n: str(raw / n) for n in DEMO_SAMPLES}, workspace=ws.root, overwrite=True)
    say(
        f"[bold]1/4 prepared[/] dataset 'demo': {sum(res.patches.values())} patches "
        f"({', '.join(f'{k} {v}' for k, v in res.patches.items())}), {res.genes} genes"
    )
    if shipped is not None:
        weights = str(shipped)
        say(note)
    elif weights is None:
        weights = str(_standin_weights(ws, spec))
        say(
            f"  no pretrained weights for {encoder} can be downloaded here: 'frozen' and 'finetune' use a seeded "
            f"random stand-in checkpoint ({weights}); pass --encoder/--weights for a real one."
        )
    for w in (weights, *(f"random:{s}" for s in seeds)):
        extract("demo", ExtractionConfig(encoder, weights=w), workspace=ws.root, overwrite=True)
    say(f"[bold]2/4 extracted[/] {encoder} token grids (frozen weights and random-init)")

    common = dict(seeds=seeds, batch_size=8, lr=1e-3)
    loocv("demo", [encoder], ["frozen", "random"], {**common, "epochs": epochs}, workspace=ws.root, overwrite=True)
    comparison = loocv(
        "demo",
        [encoder],
        ["finetune"],
        {**common, "epochs": finetune_epochs, "weights": weights, **FINETUNE_BUDGET},
        workspace=ws.root,
        overwrite=True,
    )
    say(f"[bold]3/4 trained[/] leave-one-patient-out: 3 folds × frozen, random-init, fine-tuned × {n_seeds} seed(s)")
    figures = draw_all("demo", "P5", workspace=ws.root)
    say(f"[bold]4/4 drew[/] {len(figures)} figure files")
    random, frozen, finetune = (run_key(encoder, m, m) for m in ("random", "frozen", "finetune"))
    # 32-bin blocks: a demo section holds ~11-16 patches. The study's story: random-init < frozen ≤ fine-tuned
    paired = paired_comparison("demo", [random, frozen, finetune], ws.root, seed=seed, block_bins=32)
    pairs = {(p["a"], p["b"]): p for p in paired["pairs"]}
    say(_paired_line(pairs[(random, frozen)]))
    say(_paired_line(pairs[(frozen, finetune)]))
    from analysis.report import write_report

    report = write_report("demo", workspace=ws.root)
    say(f"[bold]report[/] (opens offline, double-click it): {report}")
    places = {
        "Space Ranger-style input": raw,
        "patches and targets": res.path,
        "feature stores": ws.features_dir("demo"),
        "run folders": ws.runs_dir("demo"),
        "comparison file": Path(comparison["_path"]),
        "paired comparison": Path(paired["_path"]),
        "figures": ws.results("demo").figures_dir,
        "report": report,
    }
    return DemoResult(time.perf_counter() - t0, comparison, places=places)


def _paired_line(p: dict) -> str:
    """One pair of `analysis compare` in one line: the difference b − a and its 95 % interval."""
    lo, hi = p["ci95"]
    verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0: no difference shown"
    return (
        f"[bold]analysis compare[/] {p['b']} − {p['a']}: Δ pcc_gene {p['mean_pcc_gene_difference']:+.4f}, "
        f"95 % interval (spatial blocks and seeds) [{lo:+.4f}, {hi:+.4f}] ({verdict})"
    )


def _pretrained_note(encoder: str, seed: int) -> str:
    """What the demo says about the shipped weights its 'frozen' and 'finetune' runs start from."""
    from featcache.pretrain import shipped_record

    rec = shipped_record(encoder)
    cohort = rec["cohort"]
    if seed == cohort["seed"]:
        raise FeatcacheError(
            f"--seed {seed} is the seed of the synthetic cohort {encoder}'s shipped weights were trained on; the "
            "demo's data must be other data: choose another seed."
        )
    return (
        f"  'frozen' and 'finetune' start from featcache's own pretrained {encoder} ({rec['weights']['file']}, "
        f"sha256 {rec['weights']['sha256'][:12]}…): trained to tell each bin's tissue compartment in synthetic "
        f"patients {', '.join(cohort['trained_on'])} (seed {cohort['seed']}), none of them the demo's, and never "
        "shown expression. 'random' is the same network, randomly initialised. A small CNN on synthetic tissue: "
        "it says nothing about the real foundation models (pass --encoder/--weights for one)."
    )


def _standin_weights(ws: Workspace, spec) -> Path:
    """A fixed, seeded random checkpoint standing in for pretrained weights (none can be downloaded here)."""
    import torch
    from safetensors.torch import save_file

    from featcache.encoders import build_model

    path = ws.weights_file(f"{spec.name}-standin-seed1.safetensors")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1)
        save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(path))
    return path


def comparison_table(comparison: dict):
    """The comparison as a rich Table (for the command lines)."""
    from train.report import comparison_table as table

    return table(comparison)
