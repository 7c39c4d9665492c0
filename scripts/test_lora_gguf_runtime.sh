#!/usr/bin/env bash
# GGUF LoRA files in llama.cpp itself: builds llama-cpp-python (the same llama.cpp release whose
# converters the tests use; about 8 minutes of compiling on 2 cores) into a virtualenv beside
# fastsave's test tools, then runs the tests marked llama_runtime: the base GGUF plus the LoRA GGUF
# give the merged GGUF's next-token argmax. Usage: bash scripts/test_lora_gguf_runtime.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fastsave-llama-venv.XXXXXX")}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
PYTHON="$venv/bin/python" bash scripts/install.sh test
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    "$venv/bin/python" -m pip install --quiet "llama-cpp-python==0.3.36"
"$venv/bin/python" -m pytest -q -s -m llama_runtime tests/test_lora_gguf.py
