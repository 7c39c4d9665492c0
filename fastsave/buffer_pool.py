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
contract is done with what it read before it reads again), a lent block's when no tensor uses its
memory any more (:meth:`BufferPool.lend`: the merged blocks the producer hands to the writer).

The pool's memory, and a save's other large one-time buffers (an exactness check's product), are
mapped on their own (fastsave.mappings' :func:`mapped_memory`, in huge pages where the
kernel gives them), outside malloc's heap. glibc raises its mmap
threshold to the size of the largest block freed, then serves blocks of that size from its heap
and keeps up to twice the threshold free there: at 250M a 15 MB check product freed early in the
save left the heap 10-35 MiB above what the save held for the rest of it (extra RssAnon 37-63
MiB against a 24 MiB budget, on 2 cores). Mapped, the product is returned when it is freed and
the blocks are reused from the pool: 31-36 MiB, at the same speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator

import torch

from fastsave.mappings import mapped_memory


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
        return mapped_memory(nbytes)

    def lend(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of memory (uint8) for a block handed on (to the writer's threads): it comes
        back to the pool once no tensor uses it, views included, whichever thread drops the last."""
        memory = self.take(nbytes)
        # torch.from_numpy's storage holds this array object, and only it does: the array dies
        # with the last tensor on that storage, and its finalizer gives the memory back
        handle = memory[:nbytes].numpy()
        lent = torch.from_numpy(handle)
        weakref.finalize(handle, self.give_back, memory)
        return lent

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


def active_pool() -> BufferPool | None:
    """The pool of the save producing in this thread (:func:`pooled_buffers`), else None."""
    return _ACTIVE.get()


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
