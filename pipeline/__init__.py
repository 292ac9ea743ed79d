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
    """`train loocv`: random-init features are extracted (seeded with the run seed) when missing, then every fold
    by :func:`train.loocv.run_loocv` (``runtime``: its ``jobs``, ``in_memory``, ``overwrite``)."""
    from featcache.extract import ExtractionConfig, extract
    from train.config import TrainConfig
    from train.loocv import run_loocv

    ws = Workspace.resolve(workspace)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    seed = options.get("seed", TrainConfig.seed)
    if "random" in modes:
        ws.open_dataset(dataset)
        for e in encoders:
            if not ws.feature_store(dataset, e, random=True).exists():
                random = ExtractionConfig(e, weights=f"random:{seed}")
                extract(dataset, random, workspace=ws.root, device=device, show_progress=show_progress)
    return run_loocv(
        dataset, encoders, modes, options, workspace=ws.root, device=device, show_progress=show_progress, **runtime
    )


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
    finetune_epochs: int = 3,
    on_step=None,
) -> DemoResult:
    """The whole pipeline on a small synthetic 3-patient dataset; ``on_step(line)`` hears each finished step."""
    from analysis.figures import draw_all
    from featcache.encoders import get_spec
    from featcache.extract import ExtractionConfig, extract
    from featcache.prepare import prepare_dataset
    from featcache.synth import SynthConfig, synthesize

    t0 = time.perf_counter()
    say = on_step or (lambda line: None)
    ws = Workspace.resolve(workspace)
    spec = get_spec(encoder)
    if epochs < 1 or finetune_epochs < 1:
        raise FeatcacheError("--epochs and --finetune-epochs must be at least 1.")
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
    if weights is None:
        weights = str(_standin_weights(ws, spec))
        say(
            f"  no pretrained weights for {encoder} can be downloaded here: 'frozen' and 'finetune' use a seeded "
            f"random stand-in checkpoint ({weights}); pass --encoder/--weights for a real one."
        )
    for w in (weights, f"random:{seed}"):
        extract("demo", ExtractionConfig(encoder, weights=w), workspace=ws.root, overwrite=True)
    say(f"[bold]2/4 extracted[/] {encoder} token grids (frozen weights and random-init)")

    common = dict(seed=seed, batch_size=8, lr=1e-3)
    loocv("demo", [encoder], ["frozen", "random"], {**common, "epochs": epochs}, workspace=ws.root, overwrite=True)
    comparison = loocv(
        "demo",
        [encoder],
        ["finetune"],
        {**common, "epochs": finetune_epochs, "weights": weights, "encoder_lr": 1e-4, "micro_batch": 4},
        workspace=ws.root,
        overwrite=True,
    )
    say("[bold]3/4 trained[/] leave-one-patient-out: 3 folds × frozen, random-init, fine-tuned")
    figures = draw_all("demo", "P5", workspace=ws.root)
    say(f"[bold]4/4 drew[/] {len(figures)} figure files")
    from analysis.report import write_report

    report = write_report("demo", workspace=ws.root)
    say(f"[bold]report[/] (opens offline, double-click it): {report}")
    places = {
        "Space Ranger-style input": raw,
        "patches and targets": res.path,
        "feature stores": ws.features_dir("demo"),
        "run folders": ws.runs_dir("demo"),
        "comparison file": Path(comparison["_path"]),
        "figures": ws.results("demo").figures_dir,
        "report": report,
    }
    return DemoResult(time.perf_counter() - t0, comparison, places=places)


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
