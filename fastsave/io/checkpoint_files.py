"""The non-weight files of a checkpoint: config.json, generation_config.json, tokenizer files."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def write_config(
    config, directory: Path, dtype: torch.dtype, untied_embeddings: bool, quantization: Any = None
) -> None:
    """config.json of the saved model: dtype set, ties made true to the weights written.

    The model's own quantization_config is dropped (the merged weights are plain); ``quantization``,
    when given, is the one the checkpoint's weights are stored in (a 4-bit save's bitsandbytes
    settings, a compressed-tensors scheme's config), so transformers loads them as stored.
    """
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # the latter: older transformers' bnb
        if hasattr(config, attr):
            delattr(config, attr)
    if quantization is not None:
        config.quantization_config = quantization
    config.dtype = DTYPE_NAMES[dtype]
    if untied_embeddings:
        config.tie_word_embeddings = False
        text_config = getattr(config, "text_config", None)
        if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False
    config.save_pretrained(directory)


def write_generation_config(model: nn.Module, directory: Path) -> None:
    """generation_config.json, when the model has one."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


def write_tokenizer(tokenizer, directory: Path) -> list[str]:
    """Every tokenizer file, including tokenizer.model when the tokenizer was built from one.

    GGUF converters look for tokenizer.model; a fast tokenizer that cannot re-create it on save
    still knows the file it was loaded from, which is copied.
    """
    if tokenizer is None:
        return []
    before = {p.name for p in directory.iterdir()}
    tokenizer.save_pretrained(directory)
    if not (directory / "tokenizer.model").exists():
        source = sentencepiece_model_of(tokenizer)
        if source is not None:
            shutil.copy2(source, directory / "tokenizer.model")
    return sorted({p.name for p in directory.iterdir()} - before)


def sentencepiece_model_of(tokenizer) -> Path | None:
    """The tokenizer.model file the tokenizer was loaded from, if any (vocab_file or its folder)."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    candidates.append(getattr(tokenizer, "init_kwargs", {}).get("vocab_file"))
    name_or_path = getattr(tokenizer, "name_or_path", None)
    if name_or_path:
        candidates.append(Path(name_or_path) / "tokenizer.model")
    for candidate in candidates:
        if candidate and Path(candidate).name == "tokenizer.model" and Path(candidate).is_file():
            return Path(candidate)
    return None
