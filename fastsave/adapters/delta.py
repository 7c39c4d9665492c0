"""One adapter's delta on one weight, as data: the LoRA factors, its scaling, and its variant's extras.

A delta is built once, while planning, from a live peft layer or from a saved adapter's tensors;
its ``kind`` ("linear", "embedding", "param") is decided then, from what the layer is, and with
its DoRA ``magnitude`` gives its :attr:`LoraDelta.variant` (fastsave.adapters.variants), which
holds the arithmetic (peft's own definition, in float32 whatever dtype the factors are kept in).
``bias`` is lora_B's bias for adapters trained with ``lora_bias=True``, added to the base bias
times scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastsave.adapters.variants import Variant, variant_of

DeltaKind = Literal["linear", "embedding", "param"]


@dataclass(frozen=True, slots=True)
class LoraDelta:
    """One adapter's contribution to one weight (and, with ``bias``, to its bias)."""

    adapter: str
    kind: DeltaKind
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's learned row (or column) norms
    bias: torch.Tensor | None = None  # lora_B.bias of a lora_bias adapter
    num_experts: int = 1  # param kind: experts in the stack
    experts_out_in: bool = False  # param kind: the stack is (experts, out, in) instead of (experts, in, out)

    @property
    def variant(self) -> Variant:
        """How this delta is computed and folded in (fastsave.adapters.variants)."""
        return variant_of(self.kind, self.magnitude is not None)

    @property
    def is_dora(self) -> bool:
        """Whether the adapter is DoRA (its merge rescales whole rows)."""
        return self.magnitude is not None

    @property
    def plain_linear(self) -> bool:
        """Plain LoRA on a linear layer in (out, in) layout: ``B @ A * scaling``, nothing else."""
        return type(self.variant) is Variant and not self.fan_in_fan_out

    @property
    def rank(self) -> int:
        """The adapter's rank r."""
        return int(self.lora_a.shape[0]) // max(1, self.num_experts)

    def factors_float32(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as float32 on ``device``."""
        a = self.lora_a.detach().to(device=device, dtype=torch.float32)
        b = self.lora_b.detach().to(device=device, dtype=torch.float32)
        return b, a

    def dense_float32(self, device: torch.device | str) -> torch.Tensor:
        """The whole delta in float32, in the layout of the weight it is added to."""
        return self.variant.dense(self, device)


def merged_bias_float32(bias: torch.Tensor, deltas: list[LoraDelta]) -> torch.Tensor:
    """The base bias plus lora_B.bias * scaling of every lora_bias adapter, in float32 (peft's merge)."""
    out = bias.detach().to(torch.float32, copy=True)
    for delta in deltas:
        if delta.bias is not None:
            out += delta.bias.detach().to(device=out.device, dtype=torch.float32) * delta.scaling
    return out
