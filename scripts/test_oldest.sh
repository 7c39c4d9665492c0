#!/usr/bin/env bash
# The declared lower bounds are tested versions: a fresh virtualenv with every lower bound of
# pyproject's dependencies pinned (torch>=X becomes torch==X, ...), then the core tests (save, lora,
# fidelity on Llama/Qwen2/Gemma, the CLI, the demo). Usage: bash scripts/test_oldest.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# A virtualenv this script made for itself is removed on exit (several GB each); one passed as
# VENV_DIR is the caller's and stays.
if [ $# -ge 1 ]; then
    venv="$1"
else
    venv="$(mktemp -d "${TMPDIR:-/tmp}/fastsave-oldest-venv.XXXXXX")"
    trap 'rm -rf "$venv"' EXIT
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
mapfile -t pins < <("$py" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = []
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(;.*)?", dep)
    if not m:
        raise SystemExit(f"pyproject dependency without a plain lower bound: {dep!r}")
    pins.append(f"{m.group(1)}=={m.group(2)}" + (m.group(3) or ""))
print("\n".join(pins))
PY
)
(( ${#pins[@]} )) || { echo "no lower bounds read from pyproject.toml" >&2; exit 1; }
echo "pinned: ${pins[*]}"
"$py" -m pip install --quiet "${pins[@]}" "pytest>=7" "sentencepiece>=0.2" "protobuf>=4"
"$py" -m pip install --quiet --no-deps -e .
"$py" -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|bitsandbytes|safetensors|huggingface.hub)=='
"$py" -m pytest -q -p no:cacheprovider \
    tests/test_core_merged.py tests/test_core_lora.py tests/test_core_options.py tests/test_core_tokenizer.py \
    tests/test_core_checkpoint_names.py tests/test_cli_merge.py tests/test_core_demo.py \
    tests/test_fidelity.py -k "not test_fidelity or llama or qwen2 or gemma"
