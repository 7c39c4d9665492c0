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

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.sources.base import Source
from fastsave.sources.bnb_4bit import absmax_float32, kernels_serve


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
    n_cols = source.shape[1]
    rows_cut = n_cols % state.blocksize == 0 and n_cols % 2 == 0
    return DeviceRows(codes, state, deltas[0] if deltas else None, rows_cut)


def _row_states(plan: DeviceRows) -> tuple[torch.Tensor, object]:
    """The codes as a flat byte tensor and a state whose absmax is decoded to float32 (one decode a weight)."""
    codes = plan.codes if plan.codes.dtype == torch.uint8 else plan.codes.view(torch.uint8)
    state = copy.copy(plan.state)
    if getattr(state, "nested", False):
        state.absmax, state.nested, state.state2, state.offset = absmax_float32(plan.state), False, None, None
    return codes.reshape(-1), state


def _rows_state(state: object, i: int, j: int, n_cols: int) -> SimpleNamespace:
    """The quant state of rows ``i..j`` (absmax in float32, already decoded)."""
    per_row = n_cols // state.blocksize
    return SimpleNamespace(
        quant_type=state.quant_type,
        blocksize=state.blocksize,
        shape=torch.Size([j - i, n_cols]),
        dtype=state.dtype,
        absmax=state.absmax[i * per_row : j * per_row],
        nested=False,
    )


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
    flat, state = _row_states(plan)
    step = rows_per_device_block(n_rows, n_cols, dtype, block_bytes)
    for i in range(0, n_rows, step):
        j = min(n_rows, i + step)
        codes = flat[i * n_cols // 2 : j * n_cols // 2].reshape(-1, 1)
        lora_b = plan.delta.lora_b[i:j] if plan.delta else None
        yield _kernel(kernels, plan, codes, _rows_state(state, i, j, n_cols), lora_b, dtype)


def _kernel(kernels, plan: DeviceRows, codes, state, lora_b, dtype: torch.dtype) -> torch.Tensor:
    if plan.delta is None:
        return kernels.dequantize_4bit(codes, state, dtype=dtype)
    delta = plan.delta
    return kernels.merge_lora_4bit(
        codes, state, delta.lora_a.detach(), lora_b.detach(), delta.scaling, dtype=dtype
    )
