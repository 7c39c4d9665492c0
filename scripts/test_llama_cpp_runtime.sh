#!/usr/bin/env bash
# GGUF files in llama.cpp itself: builds llama-cpp-python (the same llama.cpp release whose
# converters the tests use; about 8 minutes of compiling on 2 cores) into a virtualenv beside
# fastsave's test tools, and llama-quantize from the same sources (cached beside the converter,
# about 6 minutes), then runs the tests marked llama_runtime: the base GGUF plus the LoRA GGUF give
# the merged GGUF's next-token argmax; q4_k_m and q5_k_m for real.
# Usage: bash scripts/test_llama_cpp_runtime.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# A virtualenv this script made for itself is removed on exit (several GB each); one passed as
# VENV_DIR is the caller's and stays.
if [ $# -ge 1 ]; then
    venv="$1"
else
    venv="$(mktemp -d "${TMPDIR:-/tmp}/fastsave-llama-venv.XXXXXX")"
    trap 'rm -rf "$venv"' EXIT
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
PYTHON="$venv/bin/python" bash scripts/install.sh test
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    "$venv/bin/python" -m pip install --quiet "llama-cpp-python==0.3.36"
"$venv/bin/python" -m pytest -q -s -m llama_runtime tests/
