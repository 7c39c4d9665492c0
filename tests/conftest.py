"""Shared fixtures: a tiny Llama checkpoint and tokenizer built locally, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The fidelity matrix (tests/test_fidelity.py fills it): case -> (max abs error of the output,
# bit-exact, max abs error of the float32 merge, bit-exact); logits: reload-vs-peft logits error as
# a fraction of how far the adapter moves them. Printed after the run; written to the file named by
# FASTSAVE_FIDELITY_MATRIX when set.
FIDELITY_MATRIX: dict[str, tuple[float, bool, float, bool]] = {}
FIDELITY_LOGITS: dict[str, float] = {}

from fastsave.tiny import attach_lora, build_tiny_tokenizer, load_4bit, save_random_model, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A random bf16 tiny Llama checkpoint with a tokenizer, on local disk."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_random_model(tiny_llama_config(), directory)
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """A llama.cpp folder with its converters and gguf-py (tests/gguf_tools.py fetches it once)."""
    from gguf_tools import llama_cpp_checkout

    return llama_cpp_checkout()


@pytest.fixture(scope="session")
def gguf(llama_cpp):
    """llama.cpp's own gguf package (gguf-py), the reader the GGUF tests hold files to."""
    import sys

    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf as module

    return module


@pytest.fixture(scope="session")
def spm_base(tmp_path_factory):
    """A tiny Llama with a sentencepiece tokenizer.model, as llama.cpp's converter reads it."""
    from fastsave.tiny import build_sentencepiece_tokenizer

    directory = tmp_path_factory.mktemp("gguf-base") / "tiny-llama-bnb-4bit"
    save_random_model(tiny_llama_config(vocab_size=300), directory)
    return directory, build_sentencepiece_tokenizer(directory)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    """The tokenizer saved beside the tiny base."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture
def qlora_model(tiny_base_dir):
    """Factory: a peft LoRA model over the tiny base loaded in 4-bit (real bitsandbytes, CPU)."""

    def make(quant_type: str = "nf4", double_quant: bool = True, seed: int = 0, **lora_kwargs):
        model = load_4bit(tiny_base_dir, quant_type=quant_type, double_quant=double_quant)
        return attach_lora(model, seed=seed, **lora_kwargs)

    return make


def fidelity_matrix_lines() -> list[str]:
    """The fidelity matrix collected in this run, one line per case."""
    width = max((len(c) for c in FIDELITY_MATRIX), default=10)
    lines = [f"{'case':<{width}}  output err  exact  float32 err  exact  logits err/effect"]
    for case, (err, exact, err32, exact32) in FIDELITY_MATRIX.items():
        lines.append(
            f"{case:<{width}}  {err:10.3g}  {'yes' if exact else 'NO':>5}  {err32:11.3g}  "
            f"{'yes' if exact32 else 'NO':>5}  {FIDELITY_LOGITS.get(case, float('nan')):.3f}"
        )
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fidelity matrix when the fidelity tests ran."""
    if not FIDELITY_MATRIX:
        return
    lines = fidelity_matrix_lines()
    terminalreporter.write_sep("-", "fidelity matrix (max abs error vs peft's merge on a float32 copy)")
    for line in lines:
        terminalreporter.write_line(line)
    if os.environ.get("FASTSAVE_FIDELITY_MATRIX"):
        Path(os.environ["FASTSAVE_FIDELITY_MATRIX"]).write_text("\n".join(lines) + "\n")


@pytest.fixture
def fastsave_log(caplog):
    """caplog with every record of the "fastsave" loggers, at every level."""
    import logging

    caplog.set_level(logging.DEBUG, logger="fastsave")
    return caplog
