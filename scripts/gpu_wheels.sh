#!/usr/bin/env bash
# Fetches, for the lent GPU machine (Python 3.12, x86-64, no package registry), the wheels of the
# dependencies its image lacks. It already holds torch, numpy, scipy, scikit-image, matplotlib, tqdm,
# threadpoolctl, safetensors and pytest. Run here, in the repository root; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "SimpleITK==2.5.*" "connected-components-3d==4.1.*"
# batchgenerators is pure Python (a source release on PyPI): build its wheel here
python3 -m pip wheel --quiet --no-deps -w .whl "batchgenerators==0.25.*"
du -sh .whl && ls .whl
