"""Merge (or just dequantize) a weight in blocks of rows that stay in the CPU cache, streamed out.

The whole-matrix path materialises several float32 copies of the weight (dequantized W, the
LoRA product, its scaled copy) and pays a page fault for every fresh 4 KiB of each: measured on 2
cores for a 14336x4096 NF4 weight with r=16, 2.0 s against 0.17 s in 4 MiB row blocks. Blocks
are rounded to the output dtype and handed to the writer one by one, so the merged tensor never
exists whole in memory.

Every element is computed by the same operations in the same order as the whole-matrix path (W in
float32; the product of the LoRA factors rounded to float32; times scaling; added in peft's order;
DoRA's row norm and rescale; one rounding to the output dtype), so the result is the same to the
bit, on conditions this module checks instead of assuming:

* rows of a linear delta ``B @ A`` are ``B[i:j] @ A``: the BLAS must give a block of the product the
  bits of the whole product. Rows of a transposed delta ``(B @ A).T`` (an embedding, or a linear
  with fan_in_fan_out) are columns of the product, ``B @ A[:, i:j]``. Each is verified once per
  shape in each process against the full product;
* DoRA's row norm ``||W + delta||`` over a block of rows must equal the norm over the whole matrix,
  row by row: verified once per shape on random values (the reduction order does not depend on them);
* a product whose blocks fail is computed whole once, into a buffer of the save's assembler (in
  memory within its allowance for whole tensors, else a spilled file), and its blocks are read
  from there: the weight still merges by rows, never as the whole-matrix path's float32 copies;
* a norm that fails goes back to the whole-matrix path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.adapters.variants import DeltaRows, ProductBlocks
from fastsave.buffer_pool import ReusedBuffer
from fastsave.dtypes import same_bits
from fastsave.io.placement import placed_empty
from fastsave.merge.assemble import block_bytes, fill, scratch_buffer, settle_working_set, spilled_buffer
from fastsave.merge.fused_rows import FusedRows, fused_rows_plan, stream_fused_rows
from fastsave.sources.base import RowReader, Source

_exact_shapes: dict[tuple, bool] = {}


# Blocks of a multiple of this many rows, where a block holds that many: measured with MKL's sgemm
# (torch 2.13, 2 threads), a block of 146 or 341 rows of a rank-16 product came out with other bits
# than the whole product for some widths (1024x3584, 3072x3072, ...), and those weights fell back to
# the whole-matrix path (several times slower); every multiple of 16 tried gave the whole product's
# bits. blockwise_product_is_exact still checks each shape.
BLAS_ROWS = 16


def rows_per_block(n_cols: int, alignment: int, size: int | None = None) -> int:
    """Rows of one block: about ``size`` bytes of float32 (default :func:`block_bytes`, the producing
    save's), a multiple of ``alignment`` (and of :data:`BLAS_ROWS` when a block holds that many)."""
    rows = max(alignment, (block_bytes() if size is None else size) // (4 * max(1, n_cols)))
    unit = math.lcm(alignment, BLAS_ROWS)
    return rows - rows % (unit if rows >= unit else alignment)


# A block of the one pass that computes the product itself holds this many times block_bytes() of
# output: the pass keeps no float32 copy of the block (the torch merge keeps three, the estimate a
# weight's merge is admitted with), only the output rounded in place, so it takes larger blocks at
# no more memory, and fewer blocks spend less of the producer's time between passes (Python, and
# torch's OpenMP workers spinning while it runs). Measured on 2 cores, saves alternating in one
# process: at 3B 1.93-2.42 s against 2.85-3.31 s with blocks of the torch merge's size (8 MiB of
# bfloat16 output against 2 MiB), at 1B 0.73-0.81 s against 0.81-1.03 s.
ONE_PASS_BLOCKS = 2


def one_pass_rows_per_block(n_cols: int, alignment: int, dtype: torch.dtype) -> int:
    """Rows of one block of a one-pass merge with the product computed in the pass (or no delta),
    output in ``dtype``: :data:`ONE_PASS_BLOCKS` times :func:`block_bytes` of output."""
    output_bytes = ONE_PASS_BLOCKS * block_bytes()
    return rows_per_block(n_cols, alignment, output_bytes * 4 // dtype.itemsize)


def block_working_bytes(n_cols: int, step: int, dora: bool) -> int:
    """float32 bytes held while one block of ``step`` rows merges: the block, a delta's rows, the
    rounded copy (and DoRA's base copy)."""
    return (3 + dora) * 4 * step * n_cols


def blockwise_product_is_exact(b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> bool:
    """Whether blocks of ``step`` rows (or columns) of ``b @ a`` computed alone give the full product's bits."""
    key = (
        "product",
        tuple(b.shape),
        b.stride(),
        tuple(a.shape),
        a.stride(),
        step,
        columns,
        torch.get_num_threads(),
    )
    if key not in _exact_shapes:
        n_rows, n_cols = b.shape[0], a.shape[1]
        extent = n_cols if columns else n_rows  # what the blocks split
        if extent <= step:
            # one block, the whole product: the same call as the product it is checked against
            _exact_shapes[key] = True
            return True
        # the whole product once (an lm_head's delta is as large as the weight), into the save's
        # check buffer (fastsave.merge.assemble: in its memory budget, or kept beside it, or
        # spilled); mm with out= runs the same kernel as @, so the blocks too go into one buffer
        # instead of fresh memory (page faults) each
        with scratch_buffer((n_rows, n_cols), torch.float32) as full:
            torch.mm(b, a, out=full)
            memory = torch.empty(step * (n_rows if columns else n_cols), dtype=full.dtype)

            def alone(i: int) -> torch.Tensor:  # block i..i+step computed alone, into contiguous memory
                size = min(step, extent - i)
                if columns:
                    return torch.mm(b, a[:, i : i + size], out=memory[: n_rows * size].view(n_rows, size))
                return torch.mm(b[i : i + size], a, out=memory[: size * n_cols].view(size, n_cols))

            def of_full(i: int) -> torch.Tensor:
                return full[:, i : i + step] if columns else full[i : i + step]

            _exact_shapes[key] = all(same_bits(of_full(i), alone(i)) for i in range(0, extent, step))
    return _exact_shapes[key]


def blockwise_row_norm_is_exact(n_rows: int, n_cols: int, step: int) -> bool:
    """Whether ``linalg.norm(x[i:j], dim=1)`` gives the bits of ``linalg.norm(x, dim=1)[i:j]`` for this shape."""
    key = ("norm", n_rows, n_cols, step, torch.get_num_threads())
    if key not in _exact_shapes:
        # the reduction order depends on the shape and the threads, not on the values: a sample of
        # the same width over a few blocks (kept small: the weight itself may not fit the budget)
        rows = min(n_rows, 3 * step + 1)
        sample = torch.randn(rows, n_cols, generator=torch.Generator().manual_seed(0))
        full = torch.linalg.norm(sample, dim=1)
        _exact_shapes[key] = all(
            same_bits(full[i : i + step], torch.linalg.norm(sample[i : i + step], dim=1))
            for i in range(0, rows, step)
        )
    return _exact_shapes[key]


def product_blocks(b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> ProductBlocks:
    """Rows i..j of ``b @ a`` (columns i..j with ``columns``, laid out as ``b @ a[:, i:j]``) with
    the whole product's bits, a fresh tensor each call.

    Computed alone where :func:`blockwise_product_is_exact` says the BLAS gives those bits (the
    usual case); else the whole product is computed once into :func:`spilled_buffer` (in memory
    within the save's allowance for whole tensors, else a file's pages) and each block is copied
    out of it. Before, such a weight went to the whole-matrix merge: three float32 copies of the
    weight in fresh memory, outside the save's budget. Under a data limit a product check can fail
    (measured once: MKL's first GEMM of a shape, without room for its workspace, gave other bits),
    and that merge did not fit.
    """
    if blockwise_product_is_exact(b, a, step, columns):
        if columns:
            return lambda i, j: b @ a[:, i:j]
        return lambda i, j: b[i:j] @ a
    whole = torch.mm(b, a, out=spilled_buffer((b.shape[0], a.shape[1]), torch.float32))
    if columns:
        return lambda i, j: whole[:, i:j].contiguous()
    return lambda i, j: whole[i:j].clone()


class _Check:
    """The BLAS checks a variant asks for when it computes its rows (fastsave.adapters.variants)."""

    def product(self, b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> bool:
        return blockwise_product_is_exact(b, a, step, columns)

    def blocks(self, b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> ProductBlocks:
        return product_blocks(b, a, step, columns)


_CHECK = _Check()


def delta_rows(delta: LoraDelta, step: int) -> DeltaRows | None:
    """Rows i..j of ``delta``'s operand with the whole delta's bits; None where its variant cannot
    give them a block at a time (fastsave.adapters.variants)."""
    return delta.variant.rows(delta, step, _CHECK)


@dataclass
class RowMerge:
    """How one weight merges by rows: its rows reader, the block step, each delta's rows, the output
    dtype, and the one-pass plan where the reader has one for these deltas (fastsave.merge.fused_rows)."""

    source: Source
    reader: RowReader
    step: int
    deltas: list[tuple[LoraDelta, DeltaRows]]
    dtype: torch.dtype
    name: str = ""  # the output tensor's, for logs and tests
    fused: FusedRows | None = None


def row_merge_plan(
    source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, name: str = ""
) -> RowMerge | None:
    """The row merge of ``source`` + ``deltas``, rounded to ``dtype``, when it gives the whole-matrix
    bits, else None.

    Applies to a 2-D source that reads rows into the CPU (from memory, a file or a GPU) and LoRA deltas on linear layers and
    embeddings (DoRA on a linear layer too; not DoRA on an embedding, whose norm runs down whole
    columns, nor on fan_in_fan_out, nor bare-parameter stacks, which stream by expert elsewhere).
    Where the one pass computes the product itself (or there is no delta), the BLAS's product is
    never read by rows, and its check of blocks against the whole product (as costly as a weight's
    product) is not run: the one pass's own check stands for it.
    """
    if len(source.shape) != 2:
        return None
    if not all(d.variant.by_rows(d) for d in deltas):
        return None
    reader = source.row_reader()
    if reader is None:
        return None
    step = rows_per_block(source.shape[1], reader.alignment)
    fused = fused_rows_plan(source, deltas, step, dtype, name, reader)
    if fused is not None and not fused.reads_blas_rows:
        # no float32 block: the pass's block may be larger (one_pass_rows_per_block)
        fused = dataclasses.replace(
            fused, step=one_pass_rows_per_block(source.shape[1], reader.alignment, dtype)
        )
        return RowMerge(source, reader, step, [], dtype, name, fused)
    if any(d.variant.needs_base for d in deltas) and not blockwise_row_norm_is_exact(*source.shape, step):
        return None
    if fused is not None and not blockwise_product_is_exact(*fused.factors, step):
        # the pass would multiply each block's rows alone; the row merge reads its rows from the
        # whole product instead (product_blocks)
        fused = None
    rows = [delta_rows(d, step) for d in deltas]
    if any(r is None for r in rows):
        return None
    return RowMerge(source, reader, step, list(zip(deltas, rows, strict=True)), dtype, name, fused)


def merged_rows(merge: RowMerge) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(i, j, rows i..j of W + every delta)`` in float32, block after block (a plan without a
    one-pass plan: that one holds the deltas).

    A block may be overwritten by the next one (the reader's ``read_into``: one block's memory
    for every block): a consumer copies what it keeps before it asks for the next.
    """
    if not merge.deltas and merge.fused is not None and merge.fused.factors is not None:
        # its delta is in the one-pass plan only: these rows would come out unmerged
        raise ValueError(
            f"{merge.name or 'this weight'}: its delta merges in the one pass (stream_row_blocks)"
        )
    n_rows, n_cols = merge.source.shape
    needs_base = any(d.variant.needs_base for d, _ in merge.deltas)
    scratch = ReusedBuffer(torch.float32) if merge.reader.read_into is not None else None
    for i in range(0, n_rows, merge.step):
        j = min(n_rows, i + merge.step)
        if scratch is not None:
            block = merge.reader.read_into(i, j, scratch.take((j - i) * n_cols, (j - i, n_cols)))
        else:
            block = merge.reader.read(i, j)
        base = block.clone() if needs_base else None
        for delta, rows in merge.deltas:
            block = delta.variant.fold(delta, base, block, rows(i, j), rows=(i, j))
        yield i, j, block


def stream_row_blocks(merge: RowMerge) -> Iterator[torch.Tensor]:
    """The merged weight, rounded once to the plan's dtype, as consecutive blocks of rows (each its
    own tensor, placed for the writer, fastsave.io.placement: a float32 block is copied, not handed
    out, since the next may overwrite it); one C pass a block where the plan has one
    (fastsave.merge.fused_rows)."""
    if merge.fused is not None:
        if merge.reader.held_bytes is not None:
            # the pass holds one block, not the torch merge's float32 copies the weight was
            # admitted with (fastsave.merge.dispatch): the rest may hold pieces for the writer
            settle_working_set(merge.fused.working_bytes(merge.dtype) + merge.reader.held_bytes)
        yield from stream_fused_rows(merge.fused, merge.dtype)
        return
    for _, _, block in merged_rows(merge):
        out = placed_empty(tuple(block.shape), merge.dtype)  # placed for the writer (fastsave.io.placement)
        out.copy_(block)  # the rounding `block.to(dtype)` does
        yield out


def merge_in_row_blocks(merge: RowMerge) -> torch.Tensor:
    """The whole merged weight, rounded once to the plan's dtype, computed block by block."""
    out = torch.empty(merge.source.shape, dtype=merge.dtype)
    if merge.fused is not None:
        return fill(out, stream_fused_rows(merge.fused, merge.dtype))
    for i, j, block in merged_rows(merge):
        out[i:j] = block
    return out
