"""Nothing in the repository is importable as a top-level ``kernels`` (or as any other module a
dependency imports), from any folder Python may start in.

transformers (>= 5.25 depends on it) and bitsandbytes import the Hugging Face ``kernels`` package.
fastsave's Triton kernels live inside the package (``fastsave/kernels/``), so no folder at the
repository root answers to that name.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_KERNELS = (REPO_ROOT / "fastsave" / "kernels").resolve()
# Folders Python puts first on sys.path: the root (python -c / -m), and each folder a script runs from.
START_FOLDERS = ["", "benchmarks", "notebooks", "tests", "scripts"]

PROBE = textwrap.dedent(
    """
    import json, os, sys
    import kernels
    result = {"file": getattr(kernels, "__file__", None), "has_api": hasattr(kernels, "get_kernel")}
    import transformers.modeling_utils  # transformers imports `kernels` here: it must not crash
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    result["loaded"] = type(model).__name__
    import fastsave.kernels as fk
    result["fastsave_kernels"] = fk.__file__
    result["fastsave_api"] = [n for n in ("available", "dequantize_4bit", "merge_lora_4bit") if callable(getattr(fk, n, None))]
    print("RESULT" + json.dumps(result))
    """
)


def _run(code: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    env = env or {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def _hugging_face_kernels() -> Path:
    """The installed Hugging Face kernels package (a test dependency through transformers or directly)."""
    dist = importlib.metadata.distribution("kernels")
    init = next(f for f in dist.files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return Path(dist.locate_file(init)).resolve()


@pytest.mark.parametrize("where", ["tmp", *[f or "repo_root" for f in START_FOLDERS]])
def test_import_kernels_gives_hugging_face_package_and_transformers_loads(where, tmp_path):
    cwd = tmp_path if where == "tmp" else REPO_ROOT / ("" if where == "repo_root" else where)
    result = _run(PROBE, cwd, str(tmp_path / "model"))
    assert result["file"] is not None and Path(result["file"]).resolve() == _hugging_face_kernels(), result
    assert result["has_api"], result
    assert result["loaded"] == "LlamaForCausalLM"
    assert Path(result["fastsave_kernels"]).resolve() == OUR_KERNELS / "__init__.py"
    assert result["fastsave_api"] == ["available", "dequantize_4bit", "merge_lora_4bit"]


def test_without_hugging_face_kernels_nothing_at_the_root_answers_to_kernels():
    """With no installed `kernels` on sys.path (an older transformers that does not depend on it),
    `import kernels` from the repository root finds nothing: transformers' probe reads it as not
    installed and `from kernels import get_kernel` raises ImportError, as bitsandbytes expects."""
    code = textwrap.dedent(
        """
        import json, sys
        sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        try:
            import kernels  # noqa: F401
            error = None
        except ImportError as e:
            error = type(e).__name__
        print("RESULT" + json.dumps({"error": error, "root_first": sys.path[0] in ("", ".")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONUSERBASE")}
    result = _run(code, REPO_ROOT, env=env | {"PYTHONNOUSERSITE": "1"})
    assert result == {"error": "ModuleNotFoundError", "root_first": True}


def test_no_start_folder_shadows_an_installed_module():
    """No file or package in a folder Python starts in has the name of a module an installed
    distribution provides (fastsave is ours)."""
    provided = importlib.metadata.packages_distributions()
    assert "kernels" in provided and "transformers" in provided  # the census is real
    clashes = []
    for folder in START_FOLDERS:
        for entry in (REPO_ROOT / folder).iterdir():
            if entry.suffix == ".py":
                name = entry.stem
            elif entry.is_dir() and (entry / "__init__.py").exists():
                name = entry.name
            else:
                continue
            owners = set(provided.get(name, ())) - {"fastsave"}
            if owners:
                clashes.append(f"{folder or '.'}/{entry.name} shadows {sorted(owners)}")
    assert clashes == []


def test_built_wheel_has_no_top_level_kernels(tmp_path):
    """What users install: the wheel's only top-level package is fastsave (kernels inside it)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    res = subprocess.run([*cmd, str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"building the wheel failed: {res.stderr[-2000:]}"
    (wheel,) = tmp_path.glob("fastsave-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fastsave"}
    assert "fastsave/kernels/__init__.py" in names and "fastsave/kernels/_api.py" in names
    # every folder of the package is a package, and ships (pyproject lists them one by one)
    folders = {str(p.parent.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "fastsave").rglob("*.py")}
    assert [f for f in sorted(folders) if not (REPO_ROOT / f / "__init__.py").is_file()] == []
    assert folders <= {n.rsplit("/", 1)[0] for n in names if n.endswith(".py")}
    # and the C sources compiled on first use
    sources = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "fastsave").rglob("*.c")}
    assert sources and sources <= set(names)
