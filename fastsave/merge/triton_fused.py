"""On CUDA, one Triton kernel for dequantize + a single plain LoRA delta (fastsave.kernels).

The kernel reads the 4-bit codes once and writes W + scaling * B @ A in float32 with the same op
order as the torch path; only the order of the rank-r sum inside the dot may differ
(fastsave.kernels.merge_lora_4bit documents the bound).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.sources.base import Source
from fastsave.sources.bnb_4bit import kernels_serve


def fused_applies(source: Source, deltas: Sequence[LoraDelta]) -> bool:
    """A packed bnb 4-bit weight on a device the kernels serve, with exactly one plain row-wise delta."""
    packed = source.packed_4bit()
    return packed is not None and len(deltas) == 1 and deltas[0].plain_linear and kernels_serve(packed[0])


def merge_fused(source: Source, deltas: Sequence[LoraDelta]) -> torch.Tensor:
    """W + scaling * B @ A in float32, by fastsave.kernels.merge_lora_4bit."""
    from fastsave import kernels

    codes, state = source.packed_4bit()
    delta = deltas[0]
    return kernels.merge_lora_4bit(
        codes, state, delta.lora_a.detach(), delta.lora_b.detach(), delta.scaling, dtype=torch.float32
    )
