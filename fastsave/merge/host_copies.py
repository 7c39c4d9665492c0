"""Device blocks to host pieces: pinned buffers, a copy stream, and the GPU kept busy meanwhile.

A block computed on the GPU reaches the writer as a host tensor. A pageable ``.cpu()`` copy
blocks the producer until the bytes are across and is staged by the driver through its own pinned
buffer; here each block is copied with ``non_blocking=True`` into pinned memory on a stream of
its own, while the compute stream already runs the next blocks' kernels. The producer hands a
block on only once its copy event has completed, so the writer (another thread) reads finished
bytes; at most ``in_flight`` blocks are computed or being copied ahead of it.

Pinned buffers come from PyTorch's caching host allocator: one the writer has dropped is reused
for a later block of the same size without a new ``cudaHostAlloc``, and the allocator does not
hand it out again before the copy recorded on it has finished. What stays cached after the save
is given back (:func:`release_cached_pinned_memory`).

Blocks of a CPU tensor (the Triton interpreter in tests) are already on the host: they are passed
through as they are (blocks on another kind of device are copied plainly).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import torch


def to_host(blocks: Iterable[torch.Tensor], in_flight: int) -> Iterator[torch.Tensor]:
    """The ``blocks`` (device tensors, in order) as contiguous host tensors, in the same order.

    ``in_flight``: how many blocks may be computed or copying ahead of the one handed on (at least 1).
    """
    pending: collections.deque[tuple[torch.Tensor, torch.cuda.Event | None]] = collections.deque()
    copy_stream: torch.cuda.Stream | None = None
    for block in blocks:
        if block.device.type != "cuda":
            yield from _drain(pending)
            yield block.to("cpu").contiguous()
            continue
        if copy_stream is None:
            copy_stream = torch.cuda.Stream(device=block.device)
        pending.append(_copy_async(block, copy_stream))
        del block  # the copy stream holds it (record_stream) until the bytes are across
        while len(pending) >= max(1, in_flight):
            yield _finished(pending.popleft())
    yield from _drain(pending)


def _copy_async(block: torch.Tensor, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Start copying ``block`` into a new pinned host tensor on ``stream``, after the kernels that made it."""
    block = block.contiguous()
    host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(block.device))
    with torch.cuda.stream(stream):
        host.copy_(block, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    # the caching allocator must not give the block's memory to a later kernel before the copy read it
    block.record_stream(stream)
    return host, done


def _finished(entry: tuple[torch.Tensor, torch.cuda.Event | None]) -> torch.Tensor:
    host, done = entry
    if done is not None:
        done.synchronize()
    return host


def _drain(pending: collections.deque) -> Iterator[torch.Tensor]:
    while pending:
        yield _finished(pending.popleft())


def release_cached_pinned_memory() -> None:
    """Give the pinned host memory the caching allocator keeps after a save back to the system."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()
