"""One adapter's delta on one weight, as data: the LoRA factors, its scaling, and its variant's extras.

A delta is built once, while planning, from a live peft layer or from a saved adapter's tensors;
its ``kind`` ("linear", "embedding", "param") is decided then, from what the layer is, and with
its DoRA ``magnitude`` gives its :attr:`LoraDelta.variant` (fastsave.adapters.variants), which
holds the arithmetic (peft's own definition, in float32 whatever dtype the factors are kept in).
``bias`` is lora_B's bias for adapters trained with ``lora_bias=True``, added to the base bias
times scaling.

:class:`TunerDelta` is the same for the other peft tuners: their tensors as data, and the variant
of the tuner's module (fastsave.adapters.ia3, loha, ...) that holds the arithmetic.
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


def merged_bias_float32(bias: torch.Tensor, deltas: list) -> torch.Tensor:
    """The base bias with every delta that changes it folded in, in peft's order, in float32
    (LoRA: lora_B.bias * scaling of a lora_bias adapter; IA3: scaled; ...)."""
    out = bias.detach().to(torch.float32, copy=True)
    for delta in deltas:
        if delta.variant.changes_bias(delta):
            out = delta.variant.fold_bias(delta, out)
    return out


@dataclass(frozen=True, slots=True)
class TunerDelta:
    """One adapter of another peft tuner (IA3, LoHa, LoKr, VeRA, trainable tokens...) on one weight.

    ``tensors``: the tuner's own tensors for this adapter, as the layer holds them (read in float32
    when used); ``settings``: what else its arithmetic needs (token indices, peft's own computation
    of a transform). ``variant`` holds the arithmetic (one module per tuner in fastsave.adapters).
    """

    adapter: str
    variant: Variant
    tensors: dict[str, torch.Tensor]
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    settings: dict[str, object] | None = None
    kind: DeltaKind = "linear"

    # what the merge strategies read of any delta (a LoraDelta's fields): none of these apply
    bias = None
    magnitude = None
    num_experts = 1
    experts_out_in = False
    is_dora = False
    plain_linear = False

    def tensor32(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tuner tensor ``key`` as float32 on ``device`` (a copy only where it must convert)."""
        return self.tensors[key].detach().to(device=device, dtype=torch.float32)

    def setting(self, key: str) -> object:
        """The non-tensor setting ``key``."""
        return (self.settings or {})[key]

    def dense_float32(self, device: torch.device | str) -> object:
        """The operand of the whole-matrix fold (see fastsave.adapters.variants)."""
        return self.variant.dense(self, device)


def change_key(deltas: tuple) -> tuple:
    """What makes the change ``deltas`` bring to a weight, by identity of the tensors that hold it:
    two tied sides with equal keys are merged by the same tensors, so stay identical
    (fastsave.plan.ties)."""
    key = []
    for delta in deltas:
        if isinstance(delta, TunerDelta):
            tensors = tuple(delta.tensors.values())
        else:
            tensors = (delta.lora_a, delta.lora_b, delta.magnitude, delta.bias)
        key.append((type(delta.variant).__name__, delta.adapter, *(id(t) for t in tensors if t is not None)))
    return tuple(key)
