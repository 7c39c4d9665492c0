"""Find llama.cpp on this machine: its converter script, its gguf-py, and (when built) llama-quantize.

fastsave never downloads or builds llama.cpp. It is found, in this order, from the ``llama_cpp=``
argument, the ``FASTSAVE_LLAMA_CPP`` environment variable, or a ``llama.cpp`` checkout in the
working directory (where Unsloth notebooks clone it). The converter (``convert_hf_to_gguf.py``) is
plain Python and needs no build; the k-quants (q4_k_m, ...) also need the ``llama-quantize`` tool,
looked for in the checkout's build folders, then ``FASTSAVE_LLAMA_QUANTIZE``, then ``PATH``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastsave.errors import LlamaCppNotFoundError

ENV_VAR = "FASTSAVE_LLAMA_CPP"
QUANTIZE_ENV_VAR = "FASTSAVE_LLAMA_QUANTIZE"
CONVERTER_NAME = "convert_hf_to_gguf.py"
_QUANTIZE_NAMES = ("llama-quantize", "llama-quantize.exe", "quantize", "quantize.exe")
_BUILD_FOLDERS = (".", "build/bin", "build/bin/Release", "build")

HOW_TO_GET = (
    "Get llama.cpp once (fastsave never downloads it at run time): `git clone --depth 1 "
    "https://github.com/ggml-org/llama.cpp`, or `pip download --no-deps --no-binary :all: "
    "llama-cpp-python` and unpack its vendor/llama.cpp folder. Then pass llama_cpp='path/to/llama.cpp' "
    f"or set {ENV_VAR}=path/to/llama.cpp. The converter needs no build and runs with this Python "
    "(it needs numpy, sentencepiece for sentencepiece tokenizers, pyyaml, requests, tqdm)."
)
HOW_TO_BUILD_QUANTIZE = (
    "Build llama.cpp's quantize tool in the checkout: `cmake -B build && cmake --build build --config "
    f"Release --target llama-quantize`, or put llama-quantize on PATH or in {QUANTIZE_ENV_VAR}. "
    "f32, f16, bf16 and q8_0 need no build."
)


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp found on this machine."""

    root: Path
    converter: Path
    gguf_py: Path | None  # the gguf package shipped with the converter (same version)
    quantize: Path | None  # llama-quantize, when built or installed


def _as_checkout(path: Path) -> Path | None:
    """The checkout folder that holds the converter, for a checkout (or the converter script) path."""
    path = path.expanduser()
    if path.is_file() and path.name == CONVERTER_NAME:
        return path.parent.resolve()
    for candidate in (path, path / "vendor" / "llama.cpp"):  # also a llama-cpp-python source tree
        if (candidate / CONVERTER_NAME).is_file():
            return candidate.resolve()
    return None


def _find_quantize(root: Path) -> Path | None:
    for folder in _BUILD_FOLDERS:
        for name in _QUANTIZE_NAMES:
            candidate = root / folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    from_env = os.environ.get(QUANTIZE_ENV_VAR)
    if from_env and Path(from_env).is_file():
        return Path(from_env)
    found = shutil.which("llama-quantize")
    return Path(found) if found else None


def find_llama_cpp(llama_cpp: str | os.PathLike | None = None, *, need_quantize: bool = False) -> LlamaCpp:
    """The llama.cpp to convert with (see the module docstring for where it is looked for).

    Raises:
        LlamaCppNotFoundError: none found (or the one named has no converter), or ``need_quantize``
            and no llama-quantize; the message says what was tried and how to get it.
    """
    if llama_cpp is not None:
        candidates = [("llama_cpp argument", Path(llama_cpp))]
    elif os.environ.get(ENV_VAR):
        candidates = [(f"{ENV_VAR}", Path(os.environ[ENV_VAR]))]
    else:
        candidates = [("the working directory", Path.cwd() / "llama.cpp")]
    root = None
    for _, path in candidates:
        root = _as_checkout(path)
        if root is not None:
            break
    if root is None:
        tried = "; ".join(f"{where}: {path} (no {CONVERTER_NAME} there)" for where, path in candidates)
        raise LlamaCppNotFoundError(f"llama.cpp was not found ({tried}). {HOW_TO_GET}")
    gguf_py = root / "gguf-py"
    tools = LlamaCpp(
        root=root,
        converter=root / CONVERTER_NAME,
        gguf_py=gguf_py if (gguf_py / "gguf").is_dir() else None,
        quantize=_find_quantize(root),
    )
    if need_quantize and tools.quantize is None:
        raise LlamaCppNotFoundError(
            f"the requested quantization needs llama.cpp's llama-quantize tool, which was not found "
            f"(looked in {root}'s build folders, {QUANTIZE_ENV_VAR} and PATH). {HOW_TO_BUILD_QUANTIZE}"
        )
    return tools
