#!/usr/bin/env bash
# The GPU checks of the training issue, as one command on the lent machine (see scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels and autoseg, runs the CUDA tests, the prediction-speed benchmark against
# nnU-Net on CUDA (issue 4), then the training-speed benchmark on CUDA with and without torch.compile.
# Everything it prints is also written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -rs tests/test_training.py tests/test_predict.py -k "cuda or fast_dev_run" 2>&1 \
  | tee "$OUT/tests.txt"
# nnU-Net's side needs nnunetv2 and its many dependencies; without them only autoseg's row is printed
# (TARGETS.md has nnU-Net's H100 figure for a 1 mm brain: 7.96 s per case with mirroring).
SKIP_NNUNET=$(python3 -c "import nnunetv2" 2>/dev/null || echo --skip-nnunet)
python3 benchmarks/predict_speed.py --device cuda --size 158 202 182 --cases 3 $SKIP_NNUNET 2>&1 | grep -v "it/s" \
  | tee "$OUT/predict_speed.txt" | tail -8
python3 benchmarks/train_speed.py --devices cuda --cases 4 --steps 20 --batches 100 --workers 12 2>&1 \
  | tee "$OUT/train_speed_eager.txt" | tail -8
python3 benchmarks/train_speed.py --devices cuda --cases 4 --steps 20 --batches 20 --workers 12 --compile 2>&1 \
  | tee "$OUT/train_speed_compile.txt" | tail -8
