"""The one rounding of a float32 result to the output dtype, with the checks that go with it."""

from __future__ import annotations

import torch

from fastsave.errors import PlanError


def round_once(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` rounded to ``dtype``; a tensor already in ``dtype`` (or not floating) as it is.

    Raises:
        PlanError: NaN/Inf in the tensor before rounding, or a float16 overflow, naming the tensor.
    """
    if not tensor.is_floating_point() or dtype == tensor.dtype:
        return tensor
    if not torch.isfinite(tensor).all():
        raise PlanError(
            f"merged tensor {name!r} holds NaN or Inf; the adapter or base weight is broken, nothing was saved"
        )
    rounded = tensor.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(rounded).all():
        raise PlanError(
            f"tensor {name!r} overflows float16 (|w| > 65504 after merging); save with dtype=torch.bfloat16"
        )
    return rounded


def to_output(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Round ``tensor`` once to ``dtype`` and bring it to the CPU, contiguous, for the writer."""
    return round_once(tensor, dtype, name).detach().to("cpu").contiguous()
