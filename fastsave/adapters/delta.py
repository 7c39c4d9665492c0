"""One adapter's delta on one weight, as data: the LoRA factors, its scaling, and its variant's extras.

A delta is built once, while planning, from a live peft layer or from a saved adapter's tensors;
its ``kind`` is decided then, from what the layer is, so the merge never looks at class names.
The arithmetic is peft's own definition (``get_delta_weight``), computed in float32 whatever
dtype the factors are kept in:

* ``linear``: ``transpose(B @ A, fan_in_fan_out) * scaling`` (peft's Linear; quantized Linear
  variants never transpose);
* ``embedding``: ``(B @ A).T * scaling`` with A = lora_embedding_A, B = lora_embedding_B;
* ``param``: LoRA on a bare parameter (peft's ParamWrapper): B @ A for a 2-D parameter, one
  rank-r pair an expert for a 3-D expert stack, paired as peft's einsum pairs them
  (:func:`param_delta_float32`).

DoRA (a ``magnitude``) rescales the merged rows (fastsave.adapters.dora); ``bias`` is lora_B's
bias for adapters trained with ``lora_bias=True``, added to the base bias times scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

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
    def is_dora(self) -> bool:
        """Whether the adapter is DoRA (its merge rescales whole rows)."""
        return self.magnitude is not None

    @property
    def plain_linear(self) -> bool:
        """Plain LoRA on a linear layer in (out, in) layout: ``B @ A * scaling``, nothing else."""
        return self.kind == "linear" and not self.fan_in_fan_out and not self.is_dora

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
        if self.kind == "param":
            return param_delta_float32(self, device)
        b, a = self.factors_float32(device)
        if self.kind == "embedding":
            return (b @ a).T * self.scaling
        delta = b @ a
        if self.fan_in_fan_out:
            delta = delta.T
        return delta * self.scaling


def param_delta_float32(delta: LoraDelta, device: torch.device | str) -> torch.Tensor:
    """peft's ParamWrapper delta in float32, in the wrapped parameter's layout.

    A 2-D parameter (a router) takes the Linear delta B @ A. A 3-D expert stack holds one rank-r
    pair an expert: A is (experts * r, in), B is (out, r * experts), paired as peft's einsum pairs
    them, in the (experts, in, out) or (experts, out, in) order peft chose for the parameter.
    """
    b, a = delta.factors_float32(device)
    if delta.num_experts == 1:
        product = b @ a
        return (product.T if delta.fan_in_fan_out else product) * delta.scaling
    a = a.reshape(delta.num_experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, delta.num_experts)
    order = "e o i" if delta.experts_out_in else "e i o"
    return torch.einsum(f"o r e, e r i -> {order}", b, a) * delta.scaling


def merged_bias_float32(bias: torch.Tensor, deltas: list[LoraDelta]) -> torch.Tensor:
    """The base bias plus lora_B.bias * scaling of every lora_bias adapter, in float32 (peft's merge)."""
    out = bias.detach().to(torch.float32, copy=True)
    for delta in deltas:
        if delta.bias is not None:
            out += delta.bias.detach().to(device=out.device, dtype=torch.float32) * delta.scaling
    return out
