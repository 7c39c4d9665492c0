"""Run llama.cpp's own tools: convert_hf_to_gguf.py on a 16-bit checkpoint, llama-quantize on a GGUF.

Both run in a child process (the converter with this Python interpreter, so it uses the torch,
numpy and transformers installed here). The child is told to stay offline: nothing it needs is on
the network, and fastsave never downloads behind the user's back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fastsave.errors import GGUFConversionError
from fastsave.export.llama_cpp import HOW_TO_BUILD_QUANTIZE, LlamaCpp
from fastsave.export.methods import file_type_name


def run_tool(command: list[str], what: str, cwd: Path) -> float:
    """Run one of llama.cpp's tools offline in ``cwd``; return the seconds.

    Raises:
        GGUFConversionError: it failed (its last lines of output in the message).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, errors="replace", check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        tail = "\n".join(output[-30:])
        raise GGUFConversionError(
            f"{what} failed (exit status {result.returncode}); command: {' '.join(command)}\n{tail}"
        )
    return time.perf_counter() - started


def convert_checkpoint(
    tools: LlamaCpp, checkpoint: Path, outfile: Path, outtype: str, split_max_size: int = 0
) -> float:
    """Convert a transformers checkpoint directory to one GGUF file of ``outtype``; return the seconds.

    Raises:
        GGUFConversionError: the converter failed (unsupported architecture, missing Python package, ...).
    """
    checkpoint, outfile = checkpoint.absolute(), outfile.absolute()
    command = [
        sys.executable,
        str(tools.converter),
        str(checkpoint),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
    ]
    if split_max_size:  # llama.cpp's own split layout: <stem>-00001-of-0000N.gguf
        command += ["--split-max-size", str(split_max_size)]
    seconds = run_tool(command, "llama.cpp's convert_hf_to_gguf.py", cwd=outfile.parent)
    if not outfile.is_file() and not split_parts(outfile):
        raise GGUFConversionError(f"convert_hf_to_gguf.py reported success but wrote no {outfile}")
    return seconds


def quantize_gguf(
    tools: LlamaCpp, infile: Path, outfile: Path, method: str, imatrix: Path | None = None
) -> float:
    """Quantize a 16-bit GGUF to ``method`` with llama-quantize; return the seconds.

    Raises:
        GGUFConversionError: no llama-quantize, or it failed.
    """
    if tools.quantize is None:
        raise GGUFConversionError(f"quantizing to {method} needs llama-quantize. {HOW_TO_BUILD_QUANTIZE}")
    infile, outfile = infile.absolute(), outfile.absolute()
    command = [str(tools.quantize)]
    if infile.name.upper().endswith(".Q8_0.GGUF"):  # first_conversion="q8_0": quantized already
        command.append("--allow-requantize")
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    kind = method
    if method == "q2_k_l":  # Unsloth's preset: q2_k with the output and token embeddings at q8_0
        command += ["--output-tensor-type", "q8_0", "--token-embedding-type", "q8_0"]
        kind = "q2_k"
    command += [str(infile), str(outfile), file_type_name(kind), str(os.cpu_count() or 1)]
    seconds = run_tool(command, "llama.cpp's llama-quantize", cwd=outfile.parent)
    if not outfile.is_file():
        raise GGUFConversionError(f"llama-quantize reported success but wrote no {outfile}")
    return seconds


def split_parts(outfile: Path) -> list[Path]:
    """The parts llama.cpp wrote for ``outfile`` split (``<stem>-00001-of-0000N.gguf``), in order."""
    return sorted(
        outfile.parent.glob(f"{outfile.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf")
    )
