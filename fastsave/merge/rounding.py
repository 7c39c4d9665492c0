"""The one rounding of a float32 result to the output dtype.

NaN, Inf and float16 overflow are caught where every written byte passes, in the output dtype
(fastsave.io.finite, called by the shard writer), so they are not scanned here a second time.
"""

from __future__ import annotations

import torch


def to_output(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` rounded once to ``dtype`` (floating tensors only), on the CPU, contiguous, for the writer.

    ``name`` is the output tensor's, for errors raised on the way.
    """
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.detach().to("cpu").contiguous()
