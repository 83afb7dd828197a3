#!/usr/bin/env bash
# The GPU checks of the training issue, as one command on the lent machine (see scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels and autoseg, runs benchmarks/gpu_epoch.py (issue 7), then the CUDA-only tests.
# Everything it prints is also written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# Issue 7's table first (it is what only this machine can measure): step limit, steady epochs with CPU and
# device augmentation, loader rates, utilisation, peak memory, compile warm-up and predict seconds per case
# (nnU-Net's epoch only where nnunetv2 is installed). Each row is printed as it is measured, so a run stopped
# by the time limit still reports what it had.
timeout "${BENCH_SECONDS:-400}" python3 benchmarks/gpu_epoch.py --cases 5 --workers 12 --predict-cases 3 2>&1 \
  | grep --line-buffered -v "it/s" | tee "$OUT/gpu_epoch.txt" | tail -40
# Then the tests that only run on CUDA (the others ran on the CPU machine).
timeout "${TEST_SECONDS:-130}" python3 -m pytest -q -rs tests -k "cuda" -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests.txt" | tail -25
