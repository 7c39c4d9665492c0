"""The one merge dispatcher: for any source x deltas, pick how to compute the output tensor.

Strategies, chosen by what can be measured of the source and the deltas (never by where they came
from), in this order:

1. ``triton``: a packed bitsandbytes 4-bit weight on a CUDA device the kernels serve, one plain
   LoRA delta: one fused kernel reads the codes once (fastsave.merge.triton_fused).
2. ``row blocks``: a 2-D source that reads rows on the CPU (4-bit, 8-bit, 16-bit in memory, a
   tensor on disk) and row-wise deltas: 4 MiB blocks merged and rounded in the cache
   (fastsave.merge.row_blocks).
3. ``whole``: the whole weight in float32, then one rounding (fastsave.merge.whole_matrix).

Every strategy gives the same bits (the tests hold each to the float32 reference). A weight with
no delta is produced by the same dispatcher, so a quantized weight is dequantized in row blocks too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastsave.adapters.delta import LoraDelta, merged_bias_float32
from fastsave.merge.rounding import to_output
from fastsave.merge.row_blocks import merge_in_row_blocks, row_block_plan
from fastsave.merge.triton_fused import fused_applies, merge_fused
from fastsave.merge.whole_matrix import merge_whole
from fastsave.sources.base import Source

Produce = Callable[[], torch.Tensor]


def strategy_for(source: Source, deltas: Sequence[LoraDelta]) -> str:
    """The name of the strategy :func:`weight_producer` would use (for logs and tests)."""
    if deltas and fused_applies(source, deltas):
        return "triton"
    if row_block_plan(source, deltas) is not None:
        return "row blocks"
    return "whole"


def weight_producer(
    source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, name: str, transposed: bool = False
) -> Produce:
    """The producer of one output weight: W from ``source`` plus ``deltas``, rounded once to ``dtype``.

    ``transposed``: the checkpoint stores the transpose of the compute layout (the merge runs in the
    compute layout, the result is transposed once at the end).
    """
    deltas = tuple(deltas)

    def produce() -> torch.Tensor:
        if deltas and fused_applies(source, deltas):
            merged = to_output(merge_fused(source, deltas), dtype, name)
        else:
            blocks = row_block_plan(source, deltas)
            if blocks is not None:
                merged = merge_in_row_blocks(source, blocks, dtype, name)
            else:
                merged = to_output(merge_whole(source, deltas), dtype, name)
        return merged.T.contiguous() if transposed else merged

    return produce


def copy_producer(source: Source, dtype: torch.dtype, name: str, transposed: bool = False) -> Produce:
    """The producer of a tensor written without any delta: floating values in ``dtype``, others as stored.

    A quantized weight goes through the dispatcher (dequantized in row blocks where it can be); a
    stored tensor is rounded once to ``dtype`` (every 16-bit value is exact in float32, so a direct
    cast rounds as a float32 detour would), or copied when it is already in ``dtype``.
    """
    if source.computed:
        return weight_producer(source, (), dtype, name, transposed)

    def produce() -> torch.Tensor:
        values = source.as_stored()
        tensor = to_output(values, dtype if values.is_floating_point() else values.dtype, name)
        return tensor.T.contiguous() if transposed else tensor

    return produce


def bias_producer(source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, name: str) -> Produce:
    """The producer of a LoRA layer's bias: the base bias plus every lora_bias adapter's, rounded once."""
    deltas = tuple(d for d in deltas if d.bias is not None)
    if not deltas:
        return copy_producer(source, dtype, name)
    return lambda: to_output(merged_bias_float32(source.as_stored(), list(deltas)), dtype, name)
