"""Scratch buffers that a block-by-block reader reuses, and a save's pool that carries their memory
from one weight to the next.

A reader that reads each block of a weight into the same buffer (the 16-bit rows of the NF4 round
trip, the float32 rows of a merge) spares a fresh allocation per block. But each weight has its own
reader, and glibc gives a freed block of megabytes back to the kernel, so the next weight's buffer
is fresh memory again, whose pages the kernel faults in and zeroes on first touch: measured on 2
cores for the round trip of a 250M model, 40-150 thousand page faults and about a third of its
time. While a save produces (fastsave.pipeline.producer), a :class:`BufferPool` is active in its
thread: the memory of a buffer whose owner is gone goes back to the pool and backs the next one.
Outside a save there is no pool and buffers are allocated as usual.

Only memory no one can still read goes back: a buffer's memory is given back when its
:class:`ReusedBuffer` is garbage (or when it grows, to the same owner's consumer, which by
contract is done with what it read before it reads again).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator

import torch


class BufferPool:
    """Free uint8 buffers, handed out again by size (the smallest that holds what is asked)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # a buffer's owner may be collected in another thread

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes``: a free one, or a new one."""
        with self._lock:
            fitting = [k for k, buffer in enumerate(self._free) if buffer.numel() >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda k: self._free[k].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give_back(self, buffer: torch.Tensor) -> None:
        """``buffer`` is no one's any more."""
        if buffer.numel():
            with self._lock:
                self._free.append(buffer)

    @property
    def free_bytes(self) -> int:
        """Bytes held for reuse."""
        with self._lock:
            return sum(buffer.numel() for buffer in self._free)


_ACTIVE: contextvars.ContextVar[BufferPool | None] = contextvars.ContextVar(
    "fastsave_buffer_pool", default=None
)


@contextlib.contextmanager
def pooled_buffers() -> Iterator[BufferPool]:
    """A pool for the :class:`ReusedBuffer` objects made in this thread until the block ends; its
    memory goes with it."""
    pool = BufferPool()
    token = _ACTIVE.set(pool)
    try:
        yield pool
    finally:
        _ACTIVE.reset(token)


class _Memory:
    """What a ReusedBuffer holds, apart from it, so that its finalizer can give it back."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)


def _give_back(pool: BufferPool, memory: _Memory) -> None:
    pool.give_back(memory.buffer)
    memory.buffer = torch.empty(0, dtype=torch.uint8)


class ReusedBuffer:
    """One buffer handed out again and again, grown when a larger one is asked for: for a consumer
    that is done with what it read into it before it reads again. Its memory comes from the active
    :class:`BufferPool` (and goes back to it when this object is garbage), else is allocated."""

    def __init__(self, dtype: torch.dtype = torch.uint8) -> None:
        self.dtype = dtype
        self._pool = _ACTIVE.get()
        self._memory = _Memory()
        if self._pool is not None:
            weakref.finalize(self, _give_back, self._pool, self._memory)

    def take(self, numel: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The first ``numel`` values of the buffer (the same memory as before when that was large
        enough), viewed as ``shape`` when given."""
        nbytes = numel * self.dtype.itemsize
        if self._memory.buffer.numel() < nbytes:
            if self._pool is not None:
                self._pool.give_back(self._memory.buffer)
                self._memory.buffer = self._pool.take(nbytes)
            else:
                self._memory.buffer = torch.empty(nbytes, dtype=torch.uint8)
        taken = self._memory.buffer[:nbytes].view(self.dtype)
        return taken if shape is None else taken.view(shape)
