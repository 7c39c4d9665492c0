#!/usr/bin/env bash
# fastsave in a real Unsloth session: a fresh virtualenv with the current Unsloth release and the
# versions it pins (transformers 5.17.0), then tests/test_unsloth.py (every save form of the README's
# Unsloth table, bit-exact, both patch forms; notebooks/unsloth_flow.ipynb with Unsloth loading).
# Unsloth runs on a CPU too. Usage: bash scripts/test_unsloth.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
UNSLOTH_VERSION="2026.10.9"
# A virtualenv this script made for itself is removed on exit (several GB each); one passed as
# VENV_DIR is the caller's and stays.
if [ $# -ge 1 ]; then
    venv="$1"
else
    venv="$(mktemp -d "${TMPDIR:-/tmp}/fastsave-unsloth-venv.XXXXXX")"
    trap 'rm -rf "$venv"' EXIT
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "torch==2.13.0"
# Unsloth's own pins would pull a CUDA stack; install it without them, then what it needs here.
"$py" -m pip install --quiet --no-deps "unsloth==$UNSLOTH_VERSION" "unsloth_zoo==$UNSLOTH_VERSION"
"$py" -m pip install --quiet "transformers==5.17.0" peft bitsandbytes "trl<=1.15" "datasets>=3.4.1,<5" \
    tyro einops msgspec torchao requests pillow triton wheel accelerate sentencepiece protobuf
# fastsave itself and its test tools, without letting pip move Unsloth's transformers
"$py" -m pip install --quiet --no-deps -e .
"$py" -m pip install --quiet safetensors huggingface_hub psutil tqdm pytest nbclient nbformat ipykernel
"$py" -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|bitsandbytes|unsloth|unsloth_zoo|trl)=='
"$py" -m pytest -q -m unsloth tests/test_unsloth.py
