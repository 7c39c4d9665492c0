"""The one merge dispatcher: for any source x deltas, pick how to compute the output tensor.

Strategies, chosen by what can be measured of the source and the deltas (never by where they came
from), in this order:

1. ``device rows``: a packed bitsandbytes 4-bit weight on a CUDA device the kernels serve, no
   delta or one plain LoRA delta: the kernels read each block of rows' codes once and write the
   output dtype, blocks sized by the VRAM budget, copied to the host while the next one is
   computed (fastsave.merge.device_rows, fastsave.merge.host_copies).
2. ``device whole``: any other weight on a GPU whose whole-matrix merge fits the save's VRAM
   allowance (fastsave.vram): merged and rounded there, copied to the host in row blocks.
3. ``row blocks``: a 2-D source that reads rows (4-bit, 8-bit, 16-bit in memory or on a GPU too
   large for the VRAM allowance, a tensor on disk) and LoRA (or DoRA) deltas of linear layers and
   embeddings: 4 MiB blocks merged and rounded in the CPU cache, streamed to the writer block by
   block (fastsave.merge.row_blocks; a 4-bit weight with at most one plain LoRA delta in one C
   pass a block, fastsave.merge.fused_rows).
4. ``experts``: a 3-D expert stack with LoRA on the stack (peft's ParamWrapper): one expert at a
   time, streamed (fastsave.merge.expert_stacks).
5. ``whole``: the whole weight in float32, then one rounding (fastsave.merge.whole_matrix).

Every strategy gives the same bits (the tests hold each to the float32 reference). A weight with
no delta is produced by the same dispatcher, so a quantized weight is dequantized in row blocks
too; a stored tensor is copied (cast where its dtype differs) in flat chunks, without a copy of
the whole.

Each producer is a :class:`Production`: the whole tensor on demand, its consecutive pieces when it
streams, and the working memory it holds beyond its output, which the save's memory budget admits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fastsave.adapters.delta import LoraDelta, merged_bias_float32
from fastsave.merge.assemble import BLOCK_BYTES, device_budget, fill, spilled_buffer
from fastsave.merge.device_rows import device_rows_plan, rows_per_device_block, stream_device_rows
from fastsave.merge.expert_stacks import expert_merge_plan, expert_working_bytes, stream_experts
from fastsave.merge.host_copies import to_host
from fastsave.merge.rounding import to_output
from fastsave.merge.row_blocks import (
    block_working_bytes,
    merge_in_row_blocks,
    row_merge_plan,
    rows_per_block,
    stream_row_blocks,
)
from fastsave.merge.whole_matrix import merge_whole
from fastsave.sources.base import Source
from fastsave.vram import BLOCKS_IN_FLIGHT, DEVICE_BLOCK_BYTES

Produce = Callable[[], torch.Tensor]
COPY_CHUNK_BYTES = 4 << 20


@dataclass
class Production:
    """How one output tensor is computed.

    Attributes:
        produce: the whole tensor (output dtype, CPU, contiguous).
        stream: the same values as consecutive pieces of the flattened tensor, when it can be
            produced in pieces (None: only whole).
        working_bytes: memory held while producing it, beyond the output pieces themselves (or a
            function estimating it, called when the tensor is produced).
    """

    produce: Produce
    stream: Callable[[], Iterator[torch.Tensor]] | None
    working_bytes: int | Callable[[], int]


def _whole_bytes(source: Source, deltas: Sequence[LoraDelta]) -> int:
    # W in float32, one dense delta, its scaled copy (and DoRA's base copy)
    copies = 3 + any(d.variant.needs_base for d in deltas) if deltas else 1
    return copies * 4 * source.numel


def _row_block_bytes(source: Source, deltas: Sequence[LoraDelta]) -> int:
    return _row_block_bytes_of(source.shape[1], any(d.variant.needs_base for d in deltas))


@functools.lru_cache(maxsize=1024)
def _row_block_bytes_of(n_cols: int, dora: bool) -> int:
    # At the largest block size, whatever the save's budget made them: the margin covers what the
    # estimate leaves out (the decoded absmax, the factors' float32 copies); estimated with the
    # save's smaller blocks, a save near its memory cap let more pieces wait and failed.
    return block_working_bytes(n_cols, rows_per_block(n_cols, 1, BLOCK_BYTES), dora)


def _estimated_working_bytes(
    source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, transposed: bool
) -> int:
    """What a weight's merge will hold, judged without reading anything (planning must stay cheap).

    Row blocks or one expert when the shapes and delta kinds allow them, else the whole matrix; a
    weight on a GPU holds host memory only for its blocks on their way (the VRAM is bounded apart). The
    strategy itself is chosen when the tensor is produced (a row reader decodes a weight's absmax,
    the exactness checks run products): should it fall back to the whole matrix (a DoRA norm
    whose blocks are not exact), the budget still admits it alone. A product whose blocks are not
    exact is read from its whole product in a buffer for whole tensors (fastsave.merge.row_blocks:
    in memory within their allowance, else spilled), as a transposed weight's whole is. Blocks are
    estimated at their largest size (a small budget makes them smaller).
    """
    by_rows = len(source.shape) == 2 and all(d.variant.by_rows(d) for d in deltas)
    # a transposed weight is merged by rows into a whole buffer, then read out by columns
    transposed_copy = source.numel * dtype.itemsize if transposed else 0
    if source.device.type == "cuda":
        # on the host: the pinned copies of the device blocks in flight, or a host row merge's blocks
        rows = _row_block_bytes(source, deltas) if by_rows else 0
        return max(BLOCKS_IN_FLIGHT * DEVICE_BLOCK_BYTES, rows) + transposed_copy
    if by_rows:
        return _row_block_bytes(source, deltas) + transposed_copy
    if len(source.shape) == 3 and deltas and all(d.variant.by_experts for d in deltas):
        return expert_working_bytes(tuple(source.shape))
    return _whole_bytes(source, deltas)


def _chosen(source: Source, deltas: tuple[LoraDelta, ...], dtype: torch.dtype, name: str, transposed: bool):
    """``(produce, stream or None)`` of the strategy for this weight, decided now."""
    device = None if transposed else device_rows_plan(source, deltas)
    if device is not None:
        block = device_budget().block_bytes(source.device)

        def device_blocks() -> Iterator[torch.Tensor]:
            return to_host(stream_device_rows(device, dtype, block), BLOCKS_IN_FLIGHT)

        return lambda: _joined(device_blocks(), source.shape, dtype), device_blocks
    if source.device.type == "cuda":
        whole_on_gpu = _whole_bytes(source, deltas) + source.numel * dtype.itemsize  # and its rounded copy
        if device_budget().fits_whole(source.device, whole_on_gpu):
            return None, lambda: _device_whole_blocks(source, deltas, dtype, transposed)
    rows = row_merge_plan(source, deltas, dtype, name)
    if rows is not None:
        if transposed:  # merged by rows in the compute layout, then read out by columns
            return (
                lambda: _transposed(merge_in_row_blocks(rows), True),
                lambda: _transposed_pieces(
                    fill(spilled_buffer(source.shape, dtype), stream_row_blocks(rows))
                ),
            )
        return lambda: merge_in_row_blocks(rows), lambda: stream_row_blocks(rows)
    experts = None if transposed else expert_merge_plan(source, deltas)
    if experts is not None:
        return lambda: torch.stack(list(stream_experts(experts, dtype))), lambda: stream_experts(
            experts, dtype
        )
    return lambda: _transposed(to_output(merge_whole(source, deltas), dtype, name), transposed), None


def weight_producer(
    source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, name: str, transposed: bool = False
) -> Production:
    """The producer of one output weight: W from ``source`` plus ``deltas``, rounded once to ``dtype``.

    ``transposed``: the checkpoint stores the transpose of the compute layout (the merge runs in the
    compute layout; the result is read out by columns). The strategy is chosen each time the tensor
    is produced, so that a plan holds no decoded state for tensors not yet (or no longer) in flight.
    """
    deltas = tuple(deltas)

    def produce() -> torch.Tensor:
        whole, pieces = _chosen(source, deltas, dtype, name, transposed)
        return whole() if whole is not None else _joined(pieces(), _output_shape(source, transposed), dtype)

    def stream() -> Iterator[torch.Tensor]:
        whole, pieces = _chosen(source, deltas, dtype, name, transposed)
        if pieces is None:
            yield whole()
        else:
            yield from pieces()

    # estimated when produced, not for every weight while planning
    return Production(produce, stream, lambda: _estimated_working_bytes(source, deltas, dtype, transposed))


def _output_shape(source: Source, transposed: bool) -> tuple[int, ...]:
    shape = tuple(source.shape)
    return shape[::-1] if transposed else shape


def _joined(pieces: Iterator[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Consecutive flat pieces as one tensor of ``shape`` (the whole, for a step that needs it)."""
    return fill(torch.empty(shape, dtype=dtype), pieces)


def _device_whole_blocks(
    source: Source, deltas: tuple[LoraDelta, ...], dtype: torch.dtype, transposed: bool
) -> Iterator[torch.Tensor]:
    """The whole-matrix merge on the source's GPU, rounded there, reaching the host in row blocks."""
    merged = merge_whole(source, deltas)
    merged = merged.to(dtype) if merged.dtype != dtype else merged
    if transposed:
        merged = merged.T.contiguous()
    merged = merged.reshape(merged.shape[0], -1) if merged.dim() > 1 else merged.reshape(1, -1)
    step = rows_per_device_block(
        merged.shape[0], merged.shape[1], dtype, device_budget().block_bytes(merged.device)
    )
    blocks = (merged[i : i + step] for i in range(0, merged.shape[0], step))
    yield from to_host(blocks, BLOCKS_IN_FLIGHT)


def _transposed(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.T.contiguous() if transposed else tensor


def _transposed_pieces(matrix: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows of ``matrix.T`` (columns of ``matrix``) a few MiB at a time, never the whole transpose."""
    n_rows, n_cols = matrix.shape
    step = max(1, COPY_CHUNK_BYTES // max(1, n_rows * matrix.element_size()))
    for start in range(0, n_cols, step):
        yield matrix[:, start : start + step].T.contiguous()


def _flat_chunks(tensor: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``tensor`` flattened, cast to ``dtype`` a few MiB at a time (views when the dtype already matches)."""
    flat = tensor.reshape(-1)
    step = max(1, COPY_CHUNK_BYTES // max(1, flat.element_size(), dtype.itemsize))
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].to(dtype)


def _row_chunks(
    read_stored: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """A 2-D tensor's values flattened, read ``read_stored`` rows at a time (views of the rows when
    the dtype already matches), a few MiB a piece."""
    rows = shape[0]
    row_bytes = max(1, math.prod(shape[1:]) * 4)  # at most float32's: a cast piece stays a few MiB too
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for i in range(0, rows, step):
        yield read_stored(i, min(rows, i + step)).reshape(-1).to(dtype)


def copy_producer(source: Source, dtype: torch.dtype, name: str, transposed: bool = False) -> Production:
    """The producer of a tensor written without any delta: floating values in ``dtype``, others as stored.

    A quantized weight goes through the dispatcher (dequantized in row blocks where it can be); a
    stored tensor is rounded once to ``dtype`` (every 16-bit value is exact in float32, so a direct
    cast rounds as a float32 detour would), or copied when it is already in ``dtype``, in flat
    chunks: no whole copy is made.
    """
    if source.computed:
        return weight_producer(source, (), dtype, name, transposed)

    # a stored (not computed) source's values are in its stored dtype
    out_dtype = dtype if source.floating else source.stored_dtype

    def produce() -> torch.Tensor:
        tensor = to_output(source.as_stored(), out_dtype, name)
        return tensor.T.contiguous() if transposed else tensor

    def stream() -> Iterator[torch.Tensor]:
        rows = source.stored_rows()
        if rows is not None:
            # a checkpoint's tensor (the command line's embedding): rows from its mapped pages a few
            # MiB at a time, never read whole into fresh memory (a Qwen2.5-0.5B-shaped merge held
            # its 272 MB tied embedding: 30% of the output in extra memory)
            yield from _row_chunks(rows, source.shape, out_dtype)
            return
        values = source.as_stored().detach()
        values = values if values.is_contiguous() else values.contiguous()
        if values.device.type == "cuda":  # cast on the GPU, a few chunks at a time across to the host
            yield from to_host(_flat_chunks(values, out_dtype), BLOCKS_IN_FLIGHT)
        else:
            yield from _flat_chunks(values.to("cpu"), out_dtype)

    return Production(produce, None if transposed else stream, 0)


def bias_producer(source: Source, deltas: Sequence[LoraDelta], dtype: torch.dtype, name: str) -> Production:
    """The producer of a LoRA layer's bias: the base bias plus every lora_bias adapter's, rounded once."""
    deltas = tuple(d for d in deltas if d.variant.changes_bias(d))
    if not deltas:
        return copy_producer(source, dtype, name)
    return Production(
        lambda: to_output(merged_bias_float32(source.as_stored(), list(deltas)), dtype, name),
        None,
        4 * source.numel,
    )
