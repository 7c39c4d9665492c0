"""An independent float32 reference for a merged LoRA module, from bitsandbytes and peft alone.

Used by the demo (and usable by anyone) to check a saved checkpoint: the base weight comes from
bitsandbytes' own dequantize, the delta from peft's own ``get_delta_weight``; no fastsave code is
involved in computing it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def reference_merged_weight(lora_layer: nn.Module, adapters: list[str] | None = None) -> torch.Tensor:
    """float32 W = bnb.dequantize_4bit(W_q) + sum of peft's deltas, for a 4-bit LoRA layer (not repacked)."""
    import bitsandbytes.functional as bnb_functional

    base = lora_layer.get_base_layer()
    state = copy.copy(base.weight.quant_state)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "the reference needs a 4-bit weight that bitsandbytes has not repacked for its CPU kernel"
        )
    state.dtype = torch.float32
    weight = bnb_functional.dequantize_4bit(base.weight.data.view(torch.uint8), state)
    for adapter in adapters or lora_layer.active_adapters:
        weight = weight + lora_layer.get_delta_weight(adapter).to(torch.float32)
    return weight
