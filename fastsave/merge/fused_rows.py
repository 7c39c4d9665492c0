"""A row block merged in one C pass: a bitsandbytes 4-bit weight, or the 4-bit round trip of ``fastsave merge``.

The row merge (fastsave.merge.row_blocks) computes a block with several torch operations: the
base's float32 rows (bitsandbytes' dequantize into fresh memory, or the NF4/FP4 round trip of a
16-bit checkpoint's rows), the rank-r product, its scaling, the add, the rounding to the output
dtype. Here the product is still torch's (the BLAS's bits, which peft's merge has), into one reused
buffer, and the rest is one C loop (fastsave/native/codes_4bit.c): the base's value, the product
times the scaling, their sum, one rounding and a count of NaN/Inf, each float32 operation rounded
on its own in that order. Measured on one core for a 1M-value block of a bitsandbytes weight:
0.30 ms against 0.45-0.47 ms for the torch operations (their memory already in place).

Two sources have such a pass. A bitsandbytes 4-bit weight on the CPU, in bitsandbytes' own layout
(not the one it repacks into on CPUs with AVX512-BF16), blocks within rows, NF4 or FP4: its codes
are decoded here, after a probe of each (quant type, blocksize, code table, output dtype, with or
without a delta) against bitsandbytes' dequantize and the torch merge on values that reach every
code. And any row reader with ``read_merged`` (fastsave.sources.base.RowReader): the round trip of
``fastsave merge`` (fastsave.sources.nf4_roundtrip), probed against the round trip followed by the
torch merge. Either serves bfloat16 or float32 output with no delta or one plain LoRA delta of a
linear layer (not DoRA, not fan_in_fan_out, no other tuner); anything else, or no compiled library
here, merges as before.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.adapters.variants import Variant
from fastsave.buffer_pool import ReusedBuffer
from fastsave.io.finite import check_finite
from fastsave.sources import nf4_native
from fastsave.sources.base import RowReader, RowReadMerged, Source
from fastsave.sources.bnb_4bit import absmax_float32, blocks_within_rows

logger = logging.getLogger(__name__)


@dataclass
class FusedRows:
    """One weight's one-pass plan: its shape and row step, the delta's factors, and the pass itself."""

    shape: tuple[int, int]
    step: int  # rows of a block
    factors: tuple[torch.Tensor, torch.Tensor] | None  # (B, A) float32, or None: no delta
    scaling: float
    merge_rows: RowReadMerged  # (i, j, product or None, scaling, out) -> NaN/Inf written
    name: str = ""  # the output tensor's, for logs and tests


def fused_rows_plan(
    source: Source,
    deltas: Sequence[LoraDelta],
    step: int,
    dtype: torch.dtype,
    name: str = "",
    reader: RowReader | None = None,
) -> FusedRows | None:
    """The one-pass plan for ``source`` + ``deltas`` in blocks of ``step`` rows (the row merge's,
    whose product check passed) rounded to ``dtype``: a bitsandbytes 4-bit weight's C pass, or the
    ``read_merged`` of its ``reader`` (the 4-bit round trip of ``fastsave merge``), when the case
    is served and its probe passed; else None. ``name``: the output tensor's."""
    if dtype not in nf4_native.MERGE_DTYPES or len(deltas) > 1 or not nf4_native.available():
        return None
    delta = deltas[0] if deltas else None
    if delta is not None and (type(delta.variant) is not Variant or delta.fan_in_fan_out):
        return None
    merge_rows = _bnb_4bit_rows(source, dtype, delta is not None)
    if merge_rows is None and reader is not None:
        merge_rows = reader.read_merged
    if merge_rows is None or len(source.shape) != 2:
        return None
    return FusedRows(
        shape=(int(source.shape[0]), int(source.shape[1])),
        step=step,
        factors=delta.factors_float32("cpu") if delta is not None else None,
        scaling=delta.scaling if delta is not None else 1.0,
        merge_rows=merge_rows,
        name=name,
    )


def _bnb_4bit_rows(source: Source, dtype: torch.dtype, delta: bool) -> RowReadMerged | None:
    """The C pass over a bitsandbytes 4-bit weight's codes, when it serves this one (see the module)."""
    packed = source.packed_4bit()
    if packed is None:
        return None
    data, state = packed
    if data.device.type != "cpu" or len(state.shape) != 2 or not blocks_within_rows(state):
        return None
    if state.quant_type not in ("nf4", "fp4") or state.blocksize % 2 or state.code.numel() != 16:
        return None
    table = state.code.to(torch.float32).contiguous()
    if not _probe(state.quant_type, state.blocksize, tuple(table.tolist()), dtype, delta):
        return None
    codes = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)
    absmax = absmax_float32(state).contiguous()
    blocksize, n_cols = state.blocksize, int(state.shape[1])
    per_row = n_cols // blocksize

    def merge_rows(i: int, j: int, product: torch.Tensor | None, scaling: float, out: torch.Tensor) -> int:
        rows_codes = codes[i * n_cols // 2 : j * n_cols // 2]
        rows_absmax = absmax[i * per_row : j * per_row]
        return nf4_native.merge_4bit(rows_codes, blocksize, table, rows_absmax, product, scaling, out)

    return merge_rows


def stream_fused_rows(plan: FusedRows, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The merged weight in ``dtype``, block after block of rows (each block its own tensor)."""
    n_rows, n_cols = plan.shape
    product = ReusedBuffer(torch.float32) if plan.factors is not None else None
    for i in range(0, n_rows, plan.step):
        j = min(n_rows, i + plan.step)
        rows = None
        if plan.factors is not None:
            b, a = plan.factors
            # mm with out= runs the kernel `b[i:j] @ a` runs: the row merge's check holds for it
            rows = torch.mm(b[i:j], a, out=product.take((j - i) * n_cols, (j - i, n_cols)))
        out = torch.empty((j - i, n_cols), dtype=dtype)
        if plan.merge_rows(i, j, rows, plan.scaling, out):  # NaN/Inf: the error naming the tensor, now
            check_finite(out, plan.name)
        yield out


@cache
def _probe(
    quant_type: str, blocksize: int, table: tuple[float, ...], dtype: torch.dtype, delta: bool
) -> bool:
    """Whether the C loop gives the bits of bitsandbytes' dequantize + the torch merge for these
    settings, on values that reach every code (a zero block, a huge and a tiny one among them)."""
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator().manual_seed(0)
    n_cols = max(2 * blocksize, 256)
    weight = torch.randn(8, n_cols, generator=generator)
    weight[0] = 0.0
    weight[1] *= 1e30
    weight[2] *= 1e-30
    weight[3] = torch.linspace(-1.0, 1.0, n_cols)
    codes, state = bnb_functional.quantize_4bit(
        weight.to(torch.bfloat16), blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    expected = bnb_functional.dequantize_4bit(codes, state32)
    product = None
    if delta:
        b = torch.randn(8, 4, generator=generator)
        a = torch.randn(4, n_cols, generator=generator)
        product = b @ a
        expected = expected.add_(product.mul(0.3))
    expected = expected.to(dtype)
    ours = torch.empty(8, n_cols, dtype=dtype)
    nf4_native.merge_4bit(
        codes.reshape(-1),
        blocksize,
        torch.tensor(table, dtype=torch.float32),
        absmax_float32(state).contiguous(),
        product,
        0.3,
        ours,
    )
    view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    same = torch.equal(ours.view(view), expected.view(view))
    if not same:
        logger.info(
            "fastsave: the compiled 4-bit merge differs from bitsandbytes' dequantize for %s blocksize %d "
            "(%s); merging those weights with torch operations",
            quant_type,
            blocksize,
            dtype,
        )
    return same
