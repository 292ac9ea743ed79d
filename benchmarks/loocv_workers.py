"""Wall time of one `train loocv` with 1 and with 2 Dask workers on this machine, and their ratio:

    python benchmarks/loocv_workers.py [--patients 3] [--epochs 6] [--decoder unet] [--repeats 2]
        [--workers 1,2] [--out benchmarks/results/loocv-workers-cpu.jsonl]

A synthetic dataset of --patients patients is prepared and its random-init tiny-cnn features
extracted once; each measurement trains every fold from scratch in a fresh copy of that workspace,
``--jobs 1`` in this process (torch on every core) and ``--jobs N`` as N single-threaded Dask worker
processes (each with cores // N torch threads; train/cluster.py). Each line records the
machine's load average, since on a shared machine it decides the result.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from featcache.extract import ExtractionConfig, extract  # noqa: E402
from featcache.prepare import prepare_dataset  # noqa: E402
from featcache.synth import SynthConfig, synthesize  # noqa: E402
from train.loocv import run_loocv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--decoder", default="unet", choices=["unet", "linear"])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    tmp = Path(tempfile.mkdtemp(prefix="fc-loocv-workers-"))
    try:
        names = [f"P{i + 1}" for i in range(a.patients)]
        cfg = SynthConfig(rows=96, cols=128, n_genes=120, seed=3)
        for i, n in enumerate(names):
            synthesize(tmp / "raw", [n], SynthConfig(**{**cfg.__dict__, "seed": 3 + i}))
        base = tmp / "base"
        prepare_dataset("bench", {n: str(tmp / "raw" / n) for n in names}, workspace=base, show_progress=False)
        extract("bench", ExtractionConfig("tiny-cnn", "random:0"), workspace=base, show_progress=False)
        options = dict(decoder=a.decoder, epochs=a.epochs, batch_size=8, val_fraction=0.0, seed=0)
        for rep in range(a.repeats):
            for jobs in (int(v) for v in a.workers.split(",")):
                ws = tmp / f"ws-{jobs}-{rep}"
                for part in ("datasets", "features"):
                    shutil.copytree(base / part, ws / part)
                t0 = time.perf_counter()
                res = run_loocv(
                    "bench",
                    ["tiny-cnn"],
                    ["random"],
                    options,
                    jobs=jobs,
                    workspace=ws,
                    device="cpu",
                    show_progress=False,
                )
                wall = time.perf_counter() - t0
                emit(
                    {
                        "bench": "loocv_workers",
                        "jobs": jobs,
                        "repeat": rep,
                        "folds": len(res["_tasks"]),
                        "epochs": a.epochs,
                        "decoder": a.decoder,
                        "wall_s": round(wall, 2),
                        "fold_s": [t["seconds"] for t in res["_tasks"]],
                        "workers": sorted({t["worker"] for t in res["_tasks"]}),
                        "load_avg_1m": round(os.getloadavg()[0], 2),
                        "cpus": os.cpu_count(),
                        "machine": platform.machine(),
                    },
                    a.out,
                )
                shutil.rmtree(ws)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
