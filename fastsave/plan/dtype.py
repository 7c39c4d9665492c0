"""The output dtype of a merged save: one rule for every input."""

from __future__ import annotations

import torch
from torch import nn

from fastsave.dtypes import SPELLINGS
from fastsave.sources import module_compute_dtype


def sixteen_bit_dtype(value: object) -> torch.dtype | None:
    """torch.float16 / torch.bfloat16 for those dtypes or their names ("float16", "bfloat16"), else None."""
    if isinstance(value, str):
        value = SPELLINGS.get(value)
    return value if value in (torch.float16, torch.bfloat16) else None


def output_dtype(root: nn.Module, requested: torch.dtype | None) -> torch.dtype:
    """The requested dtype, else the 16-bit dtype the model computes in, else bfloat16.

    "Computes in": the dtype the first quantized layer's weight was quantized from (bnb, HQQ,
    torchao), else the config's ``dtype`` / ``torch_dtype``, else its 4-bit compute dtype. A model
    loaded in float32 (or a config that names none) is saved as bfloat16, which cannot overflow.
    """
    if requested is not None:
        return requested
    for module in root.modules():
        found = sixteen_bit_dtype(module_compute_dtype(module))
        if found is not None:
            return found
    config = getattr(root, "config", None)
    quant = getattr(config, "quantization_config", None)
    compute = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else None
    if quant is not None and not isinstance(quant, dict):
        compute = getattr(quant, "bnb_4bit_compute_dtype", None)
    # `torch_dtype` only where a config has no `dtype`: transformers 5 logs a deprecation on reading it
    named = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    for candidate in (named, compute):
        found = sixteen_bit_dtype(candidate)
        if found is not None:
            return found
    return torch.bfloat16
