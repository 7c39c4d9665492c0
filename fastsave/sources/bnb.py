"""What the bitsandbytes sources share: the optional import, and the Conv1D layout transformers chose.

bitsandbytes is a dependency, but a model without bitsandbytes layers must not need it to import.
"""

from __future__ import annotations

from torch import nn

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # pragma: no cover - exercised only without bitsandbytes
    bnb = None
    bnb_functional = None


def is_4bit_module(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (NF4 or FP4) whose weight is quantized."""
    weight = getattr(module, "weight", None)
    return (
        bnb is not None
        and isinstance(module, bnb.nn.Linear4bit)
        and getattr(weight, "quant_state", None) is not None
    )


def is_8bit_module(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear8bitLt (LLM.int8) whose weight holds int8 codes."""
    import torch

    return (
        bnb is not None
        and isinstance(module, bnb.nn.Linear8bitLt)
        and getattr(module.weight, "dtype", None) == torch.int8
    )


def converted_from_conv1d(module: nn.Module) -> bool:
    """True for a bitsandbytes layer that transformers made from a ``Conv1D`` (GPT-2 and kin).

    transformers quantizes a Conv1D into a Linear4bit / Linear8bitLt by transposing its (in, out)
    weight to (out, in) first (it marks the layer with ``source_cls``); a 16-bit checkpoint of the
    architecture still stores the Conv1D layout, so the weight is transposed back on save.
    """
    source = getattr(module, "source_cls", None)
    if not isinstance(source, type) or not (is_4bit_module(module) or is_8bit_module(module)):
        return False
    from transformers.pytorch_utils import Conv1D

    return issubclass(source, Conv1D)
