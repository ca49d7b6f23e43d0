#!/usr/bin/env bash
# The GPU checks, as one script for the device machine (one CUDA GPU, no network):
#   the accuracy suite's GPU subset (12 configurations, the largest near 100 GiB at its peak)
#   measured with real CUDA allocations (allocated, max_memory_reserved against the estimate and the
#   allocator model on each run's trace, and the device's used bytes from mem_get_info), and the
#   CUDA-marked tests.
# Results land in $OUT (default benchmarks/results): accuracy_cuda.csv, accuracy_cuda.md, logs.
#
# Prepare here first (the device image has torch, typer, rich and pyyaml but not pydantic or
# annotated-types): bash scripts/gpu_wheels.sh   -> .whl/ (ignored by git), then run with carry [".whl"]:
#   bash scripts/gpu_validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$OUT/gpu_info.txt"
timeout 270 python3 benchmarks/accuracy.py --device cuda --subset gpu \
  --csv "$OUT/accuracy_cuda.csv" --markdown "$OUT/accuracy_cuda.md" 2>&1 | tee "$OUT/accuracy_cuda.log"
timeout 60 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_validate.py 2>&1 | tee "$OUT/pytest_cuda.log" || true
