#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short script for a machine without a package index.
#
# On the development host, once (pure-Python wheels that such a machine's image lacks):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl torch-pruning==1.6.1 skops==0.16.0
# On the GPU machine, from the repository root, with .whl/ beside it:
#   OUT=/some/dir bash tools/gpu_checks.sh
#
# It writes under $OUT: gpu.txt (the GPU, driver, torch), pytest_gpu.log (the CUDA and TensorRT
# tests; TensorRT ones skip where it is not installed), a torch CUDA table of resnet18 at batch 8
# with its validation, and a calibration of the shipped ONNX Runtime CPU resnet18 table to torch
# CUDA at batch 1 (the GPU row of benchmarks/calibrate.py). Each step's failure is logged and the
# next one still runs; the exit status counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/hwprune-site:$PWD
fails=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, count a failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/steps.log"
    local t0=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
    else
        echo "   FAILED ($?) in $((SECONDS - t0)) s; tail:" | tee -a "$OUT/steps.log"
        tail -5 "$OUT/$name.log" | tee -a "$OUT/steps.log"
        fails=$((fails + 1))
    fi
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/hwprune-site .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

R18=latency_tables/2026-11-30/onnxruntime-cpu-t1-b1/resnet18.parquet
step pytest_gpu python3 -m pytest -q -m gpu tests/test_backends_torch_trt.py
step profile_cuda python3 -m hwprune profile --model resnet18 --backend torch --device cuda --batch 8 \
    --configs 20 --out "$OUT/resnet18-torch-cuda-b8.parquet"
step validate_cuda python3 -m hwprune validate --table "$OUT/resnet18-torch-cuda-b8.parquet" --model resnet18 \
    --samples 10 --json
step calibrate_cuda python3 -m hwprune calibrate --table "$R18" --model resnet18 --samples 10 --backend torch \
    --device cuda --batch 1 --out "$OUT/resnet18-cpu-to-cuda.predictor.zip" --json
echo "failed steps: $fails" | tee -a "$OUT/steps.log"
exit "$fails"
