"""Shared fixtures: a tiny Llama checkpoint and tokenizer built locally, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fastsave.tiny import attach_lora, build_tiny_tokenizer, load_4bit, save_random_model, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A random bf16 tiny Llama checkpoint with a tokenizer, on local disk."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_random_model(tiny_llama_config(), directory)
    build_tiny_tokenizer(directory)
    return directory


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
