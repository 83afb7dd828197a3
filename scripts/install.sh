#!/usr/bin/env bash
# Installs autoseg with its test tools. A machine without a GPU gets the CPU build of torch; where torch
# is already importable (a GPU machine whose user installed the CUDA build of their choice), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  # Pinned: an unpinned torch would pull a multi-GB CUDA build onto a machine that cannot use it.
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
