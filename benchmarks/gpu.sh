#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md, measured in one go on a GPU machine.
#
#   bash benchmarks/gpu_wheels.sh            # once, on a machine with pip: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu.sh [all|encoders|extract|train|predict] [OUT]
#
# With the device tool: carry [".whl"], command "bash benchmarks/gpu.sh extract" then
# "bash benchmarks/gpu.sh train" (each phase fits in one 10-minute call; the dataset built by the
# first is reused by the second while the machine stays warm, and rebuilt otherwise).
#
#   encoders every registered encoder at full size, each at its own input (448 or 512 px): parameters,
#            model-forward tiles/s (bf16, batch 64) and peak memory (benchmarks/encoders.py; ~2 min).
#   extract  four encoders, model-only forward vs `featcache extract` end to end, same run, batch 64;
#            UNI2-h again with --compile; the writer-side probes; a py-spy profile of UNI2-h's
#            extraction when its ratio falls below 0.9 (the host side, by thread).
#   train    frozen LOOCV of the UNI2-h-shaped decoder: 3 folds x 200 epochs, ~220 patches per
#            patient, wall time and epoch rate vs steps on tensors already on the GPU; fine-tuning
#            DenseNet-121 and UNI2-h at batch 16: plain step vs `train finetune`, peak memory.
#   predict  (not in `all`: it synthesizes real-sized slides first) predict vs extract on the same
#            patches, DenseNet-121 and UNI2-h, peak RSS at two slide sizes.
#
# Results: JSON lines in OUT (default $OUT of the device tool, else benchmarks/results/gpu-DATE/).
set -uo pipefail
phase=${1:-all}
out=${2:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}}
mkdir -p "$out"
log() { echo "[$(date +%T)] $*" | tee -a "$out/gpu.log"; }

if [ -d .whl ] && ! python3 -c "import zarr, numcodecs, dask" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'EOF' 2>&1 | tee -a "$out/gpu.log" || exit 1
import torch, timm, zarr, numcodecs, dask, xarray
import os
assert torch.cuda.is_available() or os.environ.get("FEATCACHE_BENCH_SMOKE"), "no CUDA device"
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run)", "torch", torch.__version__, "timm", timm.__version__, "zarr", zarr.__version__,
      "dask", dask.__version__)
EOF
nproc | xargs echo "cpu cores:" | tee -a "$out/gpu.log"

# Three patients, one section each, ~220 patches of 32 x 32 bins per patient (stride 16 on 288 x 288 bins).
ws=/tmp/featcache-gpu
if [ ! -f "$ws/datasets/bench/dataset.json" ]; then
    log "building the benchmark dataset"
    python3 -m featcache synth "$ws/raw" --samples P1,P2,P5 --rows 288 --cols 288 --seed 0 >>"$out/gpu.log" 2>&1 || exit 1
    python3 -m featcache prepare -w "$ws" --dataset bench --stride 16 --workers 12 \
        --sample P1="$ws/raw/P1" --sample P2="$ws/raw/P2" --sample P5="$ws/raw/P5" >>"$out/gpu.log" 2>&1 || exit 1
fi

if [ "$phase" = all ] || [ "$phase" = encoders ]; then
    log "every registered encoder: model forward at its own pixels per bin"
    python3 benchmarks/encoders.py --device cuda --batch-size 64 --iters 10 --out "$out/encoders.jsonl" 2>>"$out/gpu.log"
fi

if [ "$phase" = all ] || [ "$phase" = extract ]; then
    log "extraction: four encoders"
    python3 benchmarks/extract.py --source-workspace "$ws" --source-dataset bench --patches 1024 --batch-size 64 \
        --iters 10 --encoders densenet121,uni2h,virchow2,hoptimus0 --out "$out/extract.jsonl" 2>>"$out/gpu.log"
    log "extraction: uni2h compiled"
    python3 benchmarks/extract.py --source-workspace "$ws" --source-dataset bench --patches 1024 --batch-size 64 \
        --iters 10 --encoders uni2h --compile --out "$out/extract-compile.jsonl" 2>>"$out/gpu.log"
    pyspy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null)
    ratio=$(python3 -c "import json,sys; print(min(json.loads(l)['ratio'] for l in open(sys.argv[1]) if 'ratio' in l))" \
        "$out/extract.jsonl" 2>/dev/null || echo 0)
    if python3 -c "import sys; sys.exit(float(sys.argv[1]) >= 0.9)" "$ratio" && [ -n "$pyspy" ]; then
        log "lowest ratio $ratio < 0.9: profiling uni2h's extraction (py-spy, by thread)"
        "$pyspy" record -r 100 --threads --nonblocking -f raw -o "$out/pyspy-extract-uni2h.txt" -- \
            python3 benchmarks/extract.py --source-workspace "$ws" --source-dataset bench --patches 1024 \
            --batch-size 64 --iters 2 --encoders uni2h >>"$out/gpu.log" 2>&1
    fi
fi

if [ "$phase" = all ] || [ "$phase" = train ]; then
    if [ ! -f "$ws/features/bench/uni2h-random.zarr/zarr.json" ]; then
        log "uni2h-shaped features (random weights) for the LOOCV"
        python3 -m featcache extract -w "$ws" --dataset bench --encoder uni2h --weights random:0 --batch-size 64 \
            >>"$out/gpu.log" 2>&1 || exit 1
    fi
    log "frozen LOOCV: 3 folds x 200 epochs"
    python3 benchmarks/decoder.py --workspace "$ws" --dataset bench --encoder uni2h --mode random --batch-size 64 \
        --steps 20 --loocv-epochs 200 --out "$out/decoder.jsonl" 2>>"$out/gpu.log"
    log "fine-tuning: plain step vs train finetune"
    python3 benchmarks/finetune.py --encoders densenet121,uni2h --batch-size 16 --steps 10 --workspace "$ws" \
        --dataset bench --epochs 2 --out "$out/finetune.jsonl" 2>>"$out/gpu.log"
fi
if [ "$phase" = predict ]; then
    for enc in densenet121 uni2h; do
        log "predict vs extract: $enc"
        python3 benchmarks/predict.py --encoder "$enc" --device cuda --batch-size 64 --workers 12 --bins 371,742 \
            --workdir /tmp/featcache-bench --out "$out/predict.jsonl" 2>>"$out/gpu.log"
    done
fi
log "done: $(ls "$out")"
