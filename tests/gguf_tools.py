"""llama.cpp's converter for the tests: from the llama-cpp-python source distribution, fetched once.

``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` (76 MB) holds llama.cpp's
source in vendor/llama.cpp; only the converter, its ``conversion`` package and gguf-py (about
2 MB) are unpacked and kept under ~/.cache/fastsave-tests (``FASTSAVE_TEST_CACHE`` to move it).
The tests skip, saying why, only when pip reports that the package registry cannot be reached;
any other failure to fetch it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_SDIST = "llama_cpp_python-0.3.36.tar.gz"
_VENDOR = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")


def cache_dir() -> Path:
    """Where the unpacked converter is kept between test runs."""
    return Path(os.environ.get("FASTSAVE_TEST_CACHE", Path.home() / ".cache" / "fastsave-tests"))


# What pip prints when it cannot reach the registry at all (no network, no DNS, a refusing proxy).
_UNREACHABLE = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ProxyError",
    "Read timed out",
)


def registry_unreachable(pip_stderr: str) -> bool:
    """True when pip's output says the package registry could not be reached (the one reason to skip)."""
    return any(sign in pip_stderr for sign in _UNREACHABLE)


def _fetch_sdist(scratch: Path) -> Path:
    """The llama-cpp-python sdist downloaded into ``scratch``; a skip only when the registry cannot be
    reached, a failure for anything else (a wrong name or version, a broken pip)."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run(
        [*command, LLAMA_CPP_PYTHON, "-d", str(scratch)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    sdist = scratch / _SDIST
    if result.returncode != 0 or not sdist.is_file():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        message = f"llama.cpp's sources ({LLAMA_CPP_PYTHON}) could not be fetched: {reason}"
        if registry_unreachable(result.stderr):
            pytest.skip(f"the package registry cannot be reached; {message}")
        pytest.fail(message)
    return sdist


def llama_cpp_checkout() -> Path:
    """A llama.cpp folder with convert_hf_to_gguf.py and gguf-py (fetched on first use), or a skip."""
    target = cache_dir() / "llama.cpp-0.3.36"
    if all((target / name).is_file() for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")):
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        sdist = _fetch_sdist(Path(scratch))
        unpacked = Path(scratch) / "llama.cpp"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(_VENDOR)
                if member.name.startswith(_VENDOR) and relative.startswith(_KEEP) and member.isfile():
                    member.name = relative
                    archive.extract(member, unpacked, filter="data")
        if target.exists():  # an older cache without every file kept now
            stale = Path(scratch) / "stale"
            os.replace(target, stale)
        os.replace(unpacked, target)
    return target


def write_fake_quantize(directory: Path) -> Path:
    """A stand-in for llama-quantize: records its arguments and what sat beside its input, copies."""
    script = directory / "llama-quantize"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, shutil, sys\n"
        "src, dst = sys.argv[-4], sys.argv[-3]\n"
        "log = os.path.join(os.path.dirname(os.path.realpath(__file__)), 'calls.jsonl')\n"
        "with open(log, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'beside': sorted(os.listdir(os.path.dirname(src)))}) + '\\n')\n"
        "shutil.copyfile(src, dst)\n"
    )
    script.chmod(0o755)
    return script


def built_llama_quantize() -> Path:
    """llama.cpp's llama-quantize, built once (cmake, that target only) from the llama.cpp sources of
    the llama-cpp-python sdist the converter comes from, cached beside it (minutes on 2 cores)."""
    cached = cache_dir() / "llama-quantize-0.3.36" / "llama-quantize"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        sdist = _fetch_sdist(Path(scratch))
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(_VENDOR)]
            archive.extractall(scratch, members=members, filter="data")
        source = Path(scratch) / _VENDOR
        build = source / "build"
        flags = [
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF",  # one binary that outlives its build folder
        ]
        for step in (
            ["cmake", "-S", str(source), "-B", str(build), *flags],
            ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 1)],
        ):
            done = subprocess.run(step, capture_output=True, text=True, timeout=3600, check=False)
            if done.returncode != 0:
                pytest.fail(
                    f"building llama-quantize failed: {' '.join(step)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
        binary = next(build.rglob("llama-quantize"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, cached)
    return cached
