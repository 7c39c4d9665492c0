"""LoRA on a bare parameter (peft's ParamWrapper, ``target_parameters``): routers and fused expert stacks.

A 2-D parameter (a router) takes the Linear delta B @ A. A 3-D expert stack holds one rank-r
pair an expert: A is (experts * r, in), B is (out, r * experts), paired as peft's einsum pairs
them, in the (experts, in, out) or (experts, out, in) order peft chose for the parameter.
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import LoraDelta


def param_delta_float32(delta: LoraDelta, device: torch.device | str) -> torch.Tensor:
    """peft's ParamWrapper delta in float32, in the wrapped parameter's layout."""
    b, a = delta.factors_float32(device)
    if delta.num_experts == 1:
        product = b @ a
        return (product.T if delta.fan_in_fan_out else product) * delta.scaling
    a = a.reshape(delta.num_experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, delta.num_experts)
    order = "e o i" if delta.experts_out_in else "e i o"
    return torch.einsum(f"o r e, e r i -> {order}", b, a) * delta.scaling
