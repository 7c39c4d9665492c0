"""DoRA's merge: the merged weight's rows rescaled to the learned magnitude (peft's own formula).

For a linear layer peft computes ``magnitude / ||W_base + delta||`` per output row (the norm over
in_features; with fan_in_fan_out the weight is stored transposed and so is the factor) and
multiplies ``(W + delta)`` by it; for an embedding, the norm is per embedding column. ``W_base``
is the weight before any adapter of this merge, ``W`` the running sum (several adapters add up).
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import LoraDelta


def dora_rescale(
    delta: LoraDelta, base: torch.Tensor, current: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """``magnitude / norm * (current + dense)``, with the norm peft uses for this layer kind."""
    magnitude = delta.magnitude.detach().to(device=base.device, dtype=torch.float32)
    if delta.kind == "embedding":
        norm = (base + dense).T.norm(p=2, dim=1, keepdim=True).T
        return (magnitude / norm) * (current + dense)
    base_t = base.T if delta.fan_in_fan_out else base
    dense_t = dense.T if delta.fan_in_fan_out else dense
    norm = torch.linalg.norm(base_t + 1 * dense_t, dim=1)
    factor = (magnitude / norm).view(-1, 1)
    if delta.fan_in_fan_out:
        factor = factor.T
    return factor * (current + dense)
