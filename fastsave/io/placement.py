"""Output blocks allocated where the writer can hand them to the disk without copying them.

An O_DIRECT write reads the memory it is given straight into the device, so the memory address must
be aligned like the file offset (fastsave.io.direct_file.ALIGN). The writer copies every piece into
aligned buffers for that, except a piece whose address is its file offset modulo ALIGN: then all
but its unaligned head and tail is written from where it lies (``AlignedWriter.write`` with
``release``). On this project's 2-core machine that copy was the largest cost of a save besides
the writes themselves.

While the producer (fastsave.pipeline.producer) produces a tensor, it says here where in its file
the next piece's first byte lands (:func:`placing`, :meth:`Placement.advance`); a block merger
allocates its output block with :func:`placed_empty` (fastsave.merge.fused_rows), which offsets
the block inside a slightly larger allocation to that phase. Outside a save, or where a block's
dtype cannot sit at that phase, it is a plain ``torch.empty``: the writer then copies it, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch

from fastsave.buffer_pool import active_pool
from fastsave.io.direct_file import ALIGN


class Placement:
    """The file offset of the next piece of the tensor being produced (its data section's offset
    is enough: the data starts at a multiple of ALIGN)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def advance(self, nbytes: int) -> None:
        """A piece of ``nbytes`` was produced: the next one lands after it."""
        self.offset += nbytes


_CURRENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "fastsave_placement", default=None
)


@contextlib.contextmanager
def placing(offset: int) -> Iterator[Placement]:
    """Within the block, output blocks made in this thread by :func:`placed_empty` are placed for
    the file offset ``offset``, advanced by the caller after each piece."""
    placement = Placement(offset)
    token = _CURRENT.set(placement)
    try:
        yield placement
    finally:
        _CURRENT.reset(token)


def placed_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor for the next piece, its first byte at an address that
    is the piece's file offset modulo ALIGN when a save is producing (else ``torch.empty``); its
    memory lent by the save's pool (fastsave.buffer_pool) when one is active.

    It costs ALIGN bytes more than the tensor (the allocation it sits in)."""
    placement = _CURRENT.get()
    itemsize = dtype.itemsize
    if placement is None or placement.offset % itemsize:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * itemsize
    pool = active_pool()  # the save's: the block's memory comes back to it once written
    raw = pool.lend(nbytes + ALIGN) if pool is not None else torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = (placement.offset - raw.data_ptr()) % ALIGN
    # the allocation's own alignment (64 bytes in torch, a page in the pool) makes this rare
    if skip % itemsize:
        return torch.empty(shape, dtype=dtype)
    return raw[skip : skip + nbytes].view(dtype).view(shape)
