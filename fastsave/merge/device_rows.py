"""On the GPU: a 4-bit weight dequantized (and merged with one LoRA delta) by Triton kernels, in row blocks.

The kernels (fastsave.kernels) read a block of rows' 4-bit codes once and write
``W + scaling * B @ A`` (or just ``W``) straight in the output dtype: no float32 copy of the weight
exists on the device, only a few blocks of output rows, sized by the save's VRAM allowance
(fastsave.vram). Each block is copied to pinned host memory while the next one is computed
(fastsave.merge.host_copies).

Cutting rows changes nothing in the values: every output element is computed from its own row's
codes, absmax and ``B`` row and its own column of ``A``, with the same operations whatever block it
falls in. A row block's quantization blocks must not straddle rows (the row width a multiple of
the blocksize); a weight whose blocks do is computed in one block. The double-quantized absmax is
decoded once per weight, as bitsandbytes decodes it, and each block reads its slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.sources.base import Source
from fastsave.sources.bnb_4bit import absmax_float32, blocks_within_rows, kernels_serve, row_range


@dataclass
class DeviceRows:
    """A packed 4-bit weight merged by the kernels in row blocks: its codes, state and (at most one) delta."""

    codes: torch.Tensor
    state: object
    delta: LoraDelta | None
    rows_cut: bool  # quantization blocks lie within rows, so any row range decodes alone


def device_rows_plan(source: Source, deltas: Sequence[LoraDelta]) -> DeviceRows | None:
    """The kernels' plan for ``source`` + ``deltas``: a packed 4-bit 2-D weight on a device the kernels
    serve, with no delta or one plain LoRA delta of a linear layer; else None."""
    packed = source.packed_4bit()
    if packed is None or len(source.shape) != 2 or len(deltas) > 1:
        return None
    codes, state = packed
    if not kernels_serve(codes):
        return None
    if deltas and not deltas[0].plain_linear:
        return None
    return DeviceRows(codes, state, deltas[0] if deltas else None, blocks_within_rows(state))


def rows_per_device_block(n_rows: int, n_cols: int, dtype: torch.dtype, block_bytes: int) -> int:
    """Rows of one device block: about ``block_bytes`` of output, at least one row."""
    return max(1, min(n_rows, block_bytes // max(1, n_cols * dtype.itemsize)))


def stream_device_rows(plan: DeviceRows, dtype: torch.dtype, block_bytes: int) -> Iterator[torch.Tensor]:
    """The weight in ``dtype`` as consecutive device blocks of rows, each computed by one kernel launch."""
    from fastsave import kernels

    n_rows, n_cols = (int(size) for size in plan.state.shape)
    if not plan.rows_cut:
        yield _kernel(kernels, plan, plan.codes, plan.state, plan.delta.lora_b if plan.delta else None, dtype)
        return
    codes = plan.codes if plan.codes.dtype == torch.uint8 else plan.codes.view(torch.uint8)
    flat, absmax = codes.reshape(-1), absmax_float32(plan.state)  # absmax decoded once a weight
    step = rows_per_device_block(n_rows, n_cols, dtype, block_bytes)
    for i in range(0, n_rows, step):
        j = min(n_rows, i + step)
        block, rows = row_range(flat, plan.state, absmax, i, j)
        lora_b = plan.delta.lora_b[i:j] if plan.delta else None
        yield _kernel(kernels, plan, block, rows, lora_b, dtype)


def _kernel(kernels, plan: DeviceRows, codes, state, lora_b, dtype: torch.dtype) -> torch.Tensor:
    if plan.delta is None:
        return kernels.dequantize_4bit(codes, state, dtype=dtype)
    delta = plan.delta
    return kernels.merge_lora_4bit(
        codes, state, delta.lora_a.detach(), lora_b.detach(), delta.scaling, dtype=dtype
    )
