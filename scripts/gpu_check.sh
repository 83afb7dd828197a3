#!/usr/bin/env bash
# The GPU checks of the training issue, as one command on the lent machine (see scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels and autoseg, runs the CUDA tests, then benchmarks/gpu_epoch.py (issue 7).
# Everything it prints is also written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -rs tests/test_training.py tests/test_predict.py tests/test_training_speed.py \
  tests/test_device_augment.py tests/test_device_pediatric.py tests/test_preprocess_torch.py -k "cuda or fast_dev_run or device" 2>&1 \
  | tee "$OUT/tests.txt"
# Issue 7's table: step limit, steady epochs with CPU and device augmentation, loader rates, utilisation,
# peak memory, compile warm-up and predict seconds per case (nnU-Net's epoch only where nnunetv2 is installed).
python3 benchmarks/gpu_epoch.py --cases 5 --workers 12 --predict-cases 3 2>&1 | grep -v "it/s" \
  | tee "$OUT/gpu_epoch.txt" | tail -25
