"""The benchmarks never reach a hub: not for models, and not for the kernel bitsandbytes' CPU
backend asks the hub for when it is imported (on a CPU with AVX-512 BF16 where the Hugging Face
`kernels` package is installed). Every script goes offline through benchmarks/benchlib.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LIBRARIES = {"torch", "transformers", "peft", "bitsandbytes", "fastsave", "huggingface_hub"}


def test_importing_benchlib_puts_the_process_and_its_children_offline():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = (
        "import os, subprocess, sys; sys.path.insert(0, sys.argv[1]); import benchlib; "
        "print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE']); "
        "subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ.get(\"HF_HUB_OFFLINE\"))'], check=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(BENCHMARKS)], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["1", "1", "1"]


def test_a_caller_s_own_setting_is_kept():
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); import benchlib; print(os.environ['HF_HUB_OFFLINE'])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(BENCHMARKS)], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "0"


def _modules(node: ast.AST) -> list[str]:
    """The top-level modules an import statement imports (none for a relative or non-import node)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module.split(".")[0]]
    return []


def test_every_benchmark_that_imports_a_hub_library_imports_benchlib_first():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "benchlib.py")
    assert len(scripts) > 10
    for script in scripts:
        tree = ast.parse(script.read_text())
        imports = [(node.lineno, module) for node in ast.walk(tree) for module in _modules(node)]
        if not any(module in LIBRARIES for _, module in imports):
            continue
        benchlib = [line for line, module in imports if module == "benchlib"]
        assert benchlib, f"{script.name} imports {LIBRARIES & {m for _, m in imports}} but not benchlib"
        # a module-level import of a library that imports bitsandbytes must come after benchlib's
        top_level = [
            node.lineno for node in tree.body if any(m in LIBRARIES - {"torch"} for m in _modules(node))
        ]
        assert all(line > min(benchlib) for line in top_level), script.name
