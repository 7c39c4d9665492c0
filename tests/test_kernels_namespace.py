"""The repo's kernels/ folder must never be importable as a top-level ``kernels`` module.

bitsandbytes and transformers probe ``import kernels`` (the Hugging Face kernels package); if ours
answered, they would try to use it (docs/ARCHITECTURE.md). It ships as ``fastsave.kernels`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_KERNELS = (REPO_ROOT / "kernels").resolve()
# benchmarks/kernels.py (the name for the kernels benchmark) is found as `kernels` whenever
# a script in benchmarks/ runs, since Python puts the script's folder first on sys.path
BENCHMARK_KERNELS = (REPO_ROOT / "benchmarks" / "kernels.py").resolve()

PROBE = textwrap.dedent(
    """
    import json, os, sys
    result = {}
    try:
        import kernels
    except ImportError as e:  # ModuleNotFoundError is a subclass
        result["top_level"] = {"error": type(e).__name__, "message": str(e)}
    else:
        f = getattr(kernels, "__file__", None)
        paths = list(getattr(kernels, "__path__", []) or [])
        api = [n for n in ("get_kernel", "available", "dequantize_4bit", "merge_lora_4bit") if hasattr(kernels, n)]
        origin = getattr(getattr(kernels, "__spec__", None), "origin", None)
        result["top_level"] = {"file": f, "path": paths, "api": api, "origin": origin}
    import transformers.modeling_utils  # transformers probes `kernels` here: it must not crash
    from transformers.utils.import_utils import is_kernels_available
    result["transformers_sees_kernels"] = is_kernels_available()
    import fastsave.kernels as fk
    result["fastsave_kernels"] = {
        "name": fk.__name__,
        "file": fk.__file__,
        "api": [n for n in ("available", "dequantize_4bit", "merge_lora_4bit") if callable(getattr(fk, n, None))],
    }
    result["fastsave_in_modules_as_kernels"] = sys.modules.get("kernels") is sys.modules.get("fastsave.kernels")
    print("RESULT" + json.dumps(result))
    """
)


def _probe(cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def _is_ours(path: str | None) -> bool:
    if not path:
        return False
    p = Path(path).resolve()
    return p in (OUR_KERNELS, BENCHMARK_KERNELS) or OUR_KERNELS in p.parents


@pytest.mark.parametrize("where", ["tmp", "repo_root", "benchmarks"])
def test_top_level_kernels_is_never_ours(where, tmp_path):
    cwd = {"tmp": tmp_path, "repo_root": REPO_ROOT, "benchmarks": REPO_ROOT / "benchmarks"}[where]
    result = _probe(cwd)
    top = result["top_level"]
    if where == "benchmarks":  # what a script run from benchmarks/ meets: the guarded benchmark file
        assert "error" not in top and Path(top["origin"]).resolve() == BENCHMARK_KERNELS, top
    if "error" not in top:
        # From the repo root Python finds ./kernels first: it must come up as an empty namespace
        # (no file, no path, no API), which the probes of transformers and bitsandbytes read as
        # "not installed". Anywhere else a `kernels` can only be someone else's (e.g. Hugging Face's).
        assert not _is_ours(top["file"]), top
        assert not any(_is_ours(p) for p in top["path"]), top
        if where in ("repo_root", "benchmarks"):
            assert top["file"] is None, top
            assert top["api"] == [] and top["path"] == [], top
            assert result["transformers_sees_kernels"] is False
    assert not result["fastsave_in_modules_as_kernels"]
    fk = result["fastsave_kernels"]
    assert fk["name"] == "fastsave.kernels"
    assert _is_ours(fk["file"])
    assert fk["api"] == ["available", "dequantize_4bit", "merge_lora_4bit"]


def test_built_wheel_has_no_top_level_kernels(tmp_path):
    """What users install: the wheel's only top-level package is fastsave (kernels inside it)."""
    import zipfile

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr[-500:]}")
    (wheel,) = tmp_path.glob("fastsave-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fastsave"}
    assert "fastsave/kernels/__init__.py" in names and "fastsave/kernels/_api.py" in names
