#!/usr/bin/env bash
# Install fastsave and its test tools from this checkout.
# A machine that already has torch (Colab, Kaggle, a CUDA box) keeps its own build; on a machine
# with none, torch 2.13.0 is installed first (on these CPU machines pip resolves it to the CPU
# build; an unpinned `pip install torch` would pull a CUDA build with several GB of wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
extras="${1:-test}"
"$PYTHON" -m pip install --quiet -e ".[${extras}]"
