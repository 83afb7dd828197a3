#!/usr/bin/env bash
# The GPU checks of the training issue, as one command on the lent machine (see scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels and autoseg, runs the CUDA tests, then the training-speed benchmark on CUDA
# with and without torch.compile. Everything it prints is also written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -rs tests/test_training.py -k "cuda or fast_dev_run" 2>&1 | tee "$OUT/tests.txt"
python3 benchmarks/train_speed.py --devices cuda --cases 4 --steps 20 --batches 100 --workers 12 2>&1 \
  | tee "$OUT/train_speed_eager.txt" | tail -8
python3 benchmarks/train_speed.py --devices cuda --cases 4 --steps 20 --batches 20 --workers 12 --compile 2>&1 \
  | tee "$OUT/train_speed_compile.txt" | tail -8
