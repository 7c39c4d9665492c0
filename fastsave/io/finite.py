"""NaN/Inf in a tensor about to be written: an error naming the tensor, at a few ms per GB.

Checked in the output dtype, after rounding, so an overflow of float16 shows too. ``aminmax`` is
one vectorized pass without temporaries: NaN propagates into both results and an infinity is
the minimum or the maximum, so two finite ends mean a finite tensor. Measured on a 2-core
AVX-512 CPU: 57 ms/GB in bfloat16 and 88 ms/GB in float16 on one thread, against 2.4 s/GB for
``torch.isfinite(t).all()`` and 0.7-1.9 s/GB for integer exponent-bit tests on an int16 view
(those need a temporary and a second pass).
"""

from __future__ import annotations

import math

import torch

from fastsave.errors import NonFiniteError


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError when the floating tensor ``tensor`` holds NaN or Inf.

    Raises:
        NonFiniteError: naming the tensor and how many values are NaN and Inf; for float16 it
            says that an overflow shows as Inf and that bfloat16 has float32's range.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    message = (
        f"tensor {name!r} ({str(tensor.dtype).removeprefix('torch.')}, {tensor.numel()} values) holds "
        f"{nan} NaN and {inf} Inf values; nothing was published and the save directory keeps its "
        "previous contents."
    )
    if tensor.dtype == torch.float16:
        message += (
            " float16 holds magnitudes up to 65504 only, so a merged weight beyond that overflows to Inf:"
            " save with dtype=torch.bfloat16 (float32's range)."
        )
    else:
        message += " The model or adapter weight is broken (a diverged training run?)."
    raise NonFiniteError(message)
