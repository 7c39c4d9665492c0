"""The merge on a whole weight at once: the fallback every source and delta supports.

W is read in float32, every delta is added in peft's order (a DoRA adapter rescales the rows of
W_base + delta), in float32, on the source's device. The caller rounds once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.sources.base import Source


def merge_whole(source: Source, deltas: Sequence[LoraDelta]) -> torch.Tensor:
    """``W + every delta`` in float32, in the compute layout; the model is left untouched."""
    weight = source.float32()
    if not deltas:
        return weight
    base = weight.clone() if any(d.variant.needs_base for d in deltas) else None
    for delta in deltas:
        weight = delta.variant.fold(delta, base, weight, delta.dense_float32(weight.device))
    return weight
