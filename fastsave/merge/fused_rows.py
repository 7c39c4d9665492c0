"""A row block merged in one C pass: a bitsandbytes 4-bit weight, the 4-bit round trip of
``fastsave merge``, or a 16-bit / float32 weight on the CPU.

The row merge (fastsave.merge.row_blocks) computes a block with several torch operations: the
base's float32 rows (bitsandbytes' dequantize into fresh memory, or the NF4/FP4 round trip of a
16-bit checkpoint's rows), the rank-r product, its scaling, the add, the rounding to the output
dtype. Here the product is still torch's (the BLAS's bits, which peft's merge has), into one reused
buffer, and the rest is one C loop (fastsave/native/codes_4bit.c): the base's value, the product
times the scaling, their sum, one rounding and a count of NaN/Inf, each float32 operation rounded
on its own in that order. Measured on one core for a 1M-value block of a bitsandbytes weight:
0.30 ms against 0.45-0.47 ms for the torch operations (their memory already in place).

Three kinds of row reader have such a pass (``RowReader.read_merged``), each after a probe of its
own: a bitsandbytes 4-bit weight on the CPU (fastsave.sources.bnb_4bit; its codes decoded in C,
probed against bitsandbytes' dequantize and the torch merge on values that reach every code), the
round trip of ``fastsave merge`` (fastsave.sources.nf4_roundtrip; probed against the round trip
followed by the torch merge), and a float32 / bfloat16 / float16 weight in memory or in a
checkpoint's mapped pages (fastsave.sources.dense, fastsave.sources.safetensors_file: a LoRA on an
unquantized model, ``--base-weights original``; probed against the torch row merge on values that
round to even, reach subnormals and overflow; at 1B on 2 cores a save of a bfloat16 LoRA model
took 1.14 s against 1.43 s, ``fastsave merge --base-weights original`` 1.54 s against 1.89 s).
Where the reader can (a bitsandbytes 4-bit weight on a CPU with AVX-512), the pass also computes
the product itself from the factors, value by value, instead of reading the BLAS's product from a
block of memory: each value from +0.0 by one fused multiply-add per rank in rank order, which is
how MKL's sgemm computes a rank-r product (found by experiment). That is not assumed: each shape's
first use compares the pass's product of random factors of that shape and layout with the BLAS's
whole product, bit for bit (:func:`inline_product_is_exact`), and a shape that differs (MKL's
kernel for a few leftover rows of some heights does) keeps the BLAS's product. On 2 cores a
512 x 2048 block took 0.35-0.39 ms against 0.61-1.39 ms for the BLAS's product and the pass.
Each serves bfloat16 or float32 output with no delta or one plain
LoRA delta of a linear layer (not DoRA, not fan_in_fan_out, no other tuner); anything else, or no
compiled library here, merges as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.adapters.variants import Variant
from fastsave.buffer_pool import ReusedBuffer
from fastsave.io.finite import check_finite, counted_finite
from fastsave.io.placement import placed_empty
from fastsave.merge.assemble import scratch_buffer
from fastsave.sources import nf4_native
from fastsave.sources.base import RowReader, RowReadFactors, RowReadMerged, Source

_inline_exact: dict[tuple, bool] = {}


@dataclass
class FusedRows:
    """One weight's one-pass plan: its shape and row step, the delta's factors, and the pass itself."""

    shape: tuple[int, int]
    step: int  # rows of a block
    factors: tuple[torch.Tensor, torch.Tensor] | None  # (B, A) float32, or None: no delta
    scaling: float
    merge_rows: RowReadMerged  # (i, j, product or None, scaling, out) -> NaN/Inf written
    name: str = ""  # the output tensor's, for logs and tests
    # (i, j, B's rows, A, scaling, out) -> NaN/Inf written, the product computed in the pass: where
    # the reader can and the pass's product of these factors is the BLAS's, bit for bit
    merge_rows_factors: RowReadFactors | None = None

    def working_bytes(self, dtype: torch.dtype) -> int:
        """What the pass holds while it produces the weight in ``dtype``, beyond the pieces handed
        on and the reader's own memory: the block being merged (in ``dtype``), the factors' float32
        copies, and a block of the BLAS's product where the pass reads one."""
        n_cols = self.shape[1]
        factors = sum(f.numel() * 4 for f in self.factors) if self.factors is not None else 0
        product = self.step * n_cols * 4 if self.reads_blas_rows else 0
        return self.step * n_cols * dtype.itemsize + factors + product

    @property
    def reads_blas_rows(self) -> bool:
        """Whether the pass reads the BLAS's product of a block's rows (which gives the whole
        product's bits only where fastsave.merge.row_blocks' check says so)."""
        return self.factors is not None and self.merge_rows_factors is None


def inline_product_is_exact(b: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the compiled pass's product of factors shaped and laid out as ``b`` and ``a``
    (float32) has the bits of the BLAS's whole product ``b @ a``, which peft's merge computes:
    checked once per shape, layout and thread count in each process, every value. The order of the
    operations depends on those, not on the values, so the check multiplies random factors: a
    weight's own could hide a different order (a LoRA B still all zeros gives zeros either way).
    The pass computes each value alone, so a match for the whole product holds for every block of
    its rows."""
    key = (tuple(b.shape), b.stride(), tuple(a.shape), a.stride(), torch.get_num_threads())
    if key not in _inline_exact:
        generator = torch.Generator().manual_seed(0)
        b, a = (
            torch.empty_strided(f.shape, f.stride(), dtype=torch.float32).copy_(
                torch.randn(f.shape, generator=generator)
            )
            for f in (b, a)
        )
        n_rows, n_cols = int(b.shape[0]), int(a.shape[1])
        # the whole product into the save's check buffer (counted in its budget, or spilled); the
        # pass's values are compared with it as they are computed, a row piece at a time on the
        # stack (a product of its own in 4 MiB pieces and torch's compare took 28 of the 58-70 ms
        # of a first 1B save's checks on 2 cores)
        with scratch_buffer((n_rows, n_cols), torch.float32) as full:
            torch.mm(b, a, out=full)
            _inline_exact[key] = nf4_native.lora_product_mismatches(b.contiguous(), a.contiguous(), full) == 0
    return _inline_exact[key]


def fused_rows_plan(
    source: Source,
    deltas: Sequence[LoraDelta],
    step: int,
    dtype: torch.dtype,
    name: str = "",
    reader: RowReader | None = None,
) -> FusedRows | None:
    """The one-pass plan for ``source`` + ``deltas`` in blocks of ``step`` rows (the row merge's)
    rounded to ``dtype``, when its ``reader`` merges in one pass (``read_merged``: a bitsandbytes
    4-bit weight, the 4-bit round trip of ``fastsave merge``, a 16-bit weight) and the deltas are a
    case that pass serves; else None. ``name``: the output tensor's. A plan that
    :attr:`~FusedRows.reads_blas_rows` holds only where the row merge's product check passes (the
    row merge runs it)."""
    # a reader has read_merged only where the compiled library loaded and its probe passed
    if dtype not in nf4_native.MERGE_DTYPES or len(deltas) > 1:
        return None
    delta = deltas[0] if deltas else None
    if delta is not None and (type(delta.variant) is not Variant or delta.fan_in_fan_out):
        return None
    merge_rows = reader.read_merged if reader is not None else None
    if merge_rows is None or len(source.shape) != 2:
        return None
    factors = delta.factors_float32("cpu") if delta is not None else None
    with_factors = reader.read_merged_factors if factors is not None else None
    if with_factors is not None and not inline_product_is_exact(*factors):
        with_factors = None
    return FusedRows(
        shape=(int(source.shape[0]), int(source.shape[1])),
        step=step,
        factors=factors,
        scaling=delta.scaling if delta is not None else 1.0,
        merge_rows=merge_rows,
        name=name,
        merge_rows_factors=with_factors,
    )


def stream_fused_rows(plan: FusedRows, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The merged weight in ``dtype``, block after block of rows (each block its own tensor, placed
    for the writer to take it without a copy: fastsave.io.placement)."""
    n_rows, n_cols = plan.shape
    merge = _block_merge(plan)
    for i in range(0, n_rows, plan.step):
        j = min(n_rows, i + plan.step)
        out = placed_empty((j - i, n_cols), dtype)
        if merge(i, j, out):  # NaN/Inf: the error naming the tensor, now
            check_finite(out, plan.name)
        yield counted_finite(out)  # the pass counted its NaN/Inf: the writer's check skips it


def _block_merge(plan: FusedRows) -> Callable[[int, int, torch.Tensor], int]:
    """One block's pass, (i, j, out) -> NaN/Inf written: with the product computed in it from the
    factors, or with the BLAS's product of the block's rows (into one reused buffer), or without a
    delta."""
    if plan.factors is None:
        return lambda i, j, out: plan.merge_rows(i, j, None, plan.scaling, out)
    if plan.merge_rows_factors is not None:
        b, a = (f.contiguous() for f in plan.factors)
        return lambda i, j, out: plan.merge_rows_factors(i, j, b[i:j], a, plan.scaling, out)
    b, a = plan.factors
    product = ReusedBuffer(torch.float32)

    def with_product(i: int, j: int, out: torch.Tensor) -> int:
        # mm with out= runs the kernel `b[i:j] @ a` runs: the row merge's check holds for it
        rows = torch.mm(b[i:j], a, out=product.take(out.numel(), tuple(out.shape)))
        return plan.merge_rows(i, j, rows, plan.scaling, out)

    return with_product
