"""Whole tensors for the steps that need one, in memory when they fit the budget, else spilled to disk.

Most plan items stream to the writer piece by piece. A few steps need a produced tensor whole:
transformers' checkpoint-layout reversal (fused MoE experts split back per expert, projections
joined), the 4-bit re-quantization of ``merged_4bit_forced``, and a Conv1D weight that is merged in
its compute layout and stored transposed. Such a tensor is assembled from its pieces into a buffer:
anonymous memory when it fits what the budget allows, otherwise a file in the spill directory
(``temporary_location``, or beside the staging directory) mapped shared, whose pages are page
cache that the kernel writes back and reclaims, not anonymous memory. The file is unlinked as soon
as it is mapped, so nothing is left on disk even if the process is killed.

The producer thread sets the active assembler (:func:`assembling`); without one (planning,
tests), tensors are assembled in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from fastsave.errors import SaveStopped
from fastsave.mappings import mapped_memory
from fastsave.vram import DeviceBudget

if TYPE_CHECKING:
    from fastsave.memory import ByteBudget


class PlannedPieces(Protocol):
    """What :func:`assemble` reads of a planned tensor (fastsave.plan.items.PlanItem is one)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def produce(self) -> Callable[[], torch.Tensor]: ...

    @property
    def stream(self) -> Callable[[], Iterator[torch.Tensor]] | None: ...


_ACTIVE: contextvars.ContextVar[Assembler | None] = contextvars.ContextVar("fastsave_assembler", default=None)


# float32 bytes of one row block when the budget is large: fits in L2/L3 next to its copies
BLOCK_BYTES = 4 << 20
# never smaller: below this the per-block overhead dominates the merge
MIN_BLOCK_BYTES = 256 << 10
# the share of free VRAM merge work may hold outside a save (planning, direct calls in tests)
DEFAULT_DEVICE_FRACTION = 0.5


class Assembler:
    """Builds whole tensors: in memory up to ``allowance`` bytes, spilled into ``spill_directory`` beyond.

    It also carries the producer's block size: a row block's float32 working set is a few copies of
    ``block_bytes``, so a small allowance (a process near its memory cap) gets small blocks; and the
    save's VRAM budget, for weights merged on a GPU.
    """

    def __init__(
        self,
        spill_directory: Path | None,
        allowance: int,
        block_bytes: int = BLOCK_BYTES,
        device_budget: DeviceBudget | None = None,
        check_allowance: int = 0,
        budget: ByteBudget | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.spill_directory = spill_directory
        self.allowance = allowance
        self.block_bytes = block_bytes
        self.device_budget = device_budget or DeviceBudget(DEFAULT_DEVICE_FRACTION)
        # an exactness check's reference product is admitted against the save's byte ``budget``
        # where it fits its limit, else kept beside it up to ``check_allowance`` bytes in one buffer
        # every such check reuses (fastsave.memory.MemoryBudget.check_allowance); ``stop``: the
        # save's, set when the writer failed (nothing is waited for then)
        self.check_allowance = check_allowance
        self.budget = budget
        self.stop = stop
        self._check_memory: torch.Tensor | None = None
        self.spilled_bytes = 0
        self._names = itertools.count()

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype, limit: int | None = None) -> torch.Tensor:
        """An uninitialised tensor: anonymous memory when it fits the allowance (or ``limit``), else a
        spilled file."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if (
            self.spill_directory is None
            or nbytes <= (self.allowance if limit is None else limit)
            or numel == 0
        ):
            return torch.empty(shape, dtype=dtype)
        self.spill_directory.mkdir(parents=True, exist_ok=True)
        path = self.spill_directory / f"spill-{os.getpid()}-{uuid.uuid4().hex[:8]}-{next(self._names)}"
        try:
            tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # the mapping keeps the pages; the name goes now
        self.spilled_bytes += nbytes
        return tensor.view(shape)

    @contextlib.contextmanager
    def check_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """A buffer for an exactness check's reference product while the block runs: in memory
        admitted against the save's byte budget when it fits its limit (waiting for written pieces
        to make room), else the save's one kept check buffer (grown to the largest asked) up to
        ``check_allowance`` bytes, else in memory up to a few row blocks and spilled beyond.

        Raises:
            SaveStopped: the save stopped (its writer failed) while the check waited for room.
        """
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if self.spill_directory is not None and self.budget is not None and nbytes <= self.budget.limit:
            if not self.budget.borrow(nbytes, self.stop):
                raise SaveStopped("the save stopped while an exactness check waited for memory")
            try:  # mapped, so that it leaves nothing in malloc's heap (fastsave.buffer_pool)
                yield mapped_memory(nbytes).view(dtype).view(shape)
            finally:
                self.budget.give_back(nbytes)
        elif self.spill_directory is None or nbytes > self.check_allowance:
            yield self.buffer(shape, dtype, limit=min(self.allowance, 4 * self.block_bytes))
        else:
            if self._check_memory is None or self._check_memory.numel() < nbytes:
                self._check_memory = None  # the smaller one goes before the larger one is made
                self._check_memory = torch.empty(nbytes, dtype=torch.uint8)
            yield self._check_memory[:nbytes].view(dtype).view(shape)


# outside a save (planning, tests): in memory, default block size; made once (planning asks per tensor)
_OUTSIDE_A_SAVE = Assembler(None, 0)


def _active() -> Assembler:
    return _ACTIVE.get() or _OUTSIDE_A_SAVE


@contextlib.contextmanager
def assembling(assembler: Assembler) -> Iterator[Assembler]:
    """Make ``assembler`` the one :func:`assemble` uses in this thread (the producer's)."""
    token = _ACTIVE.set(assembler)
    try:
        yield assembler
    finally:
        _ACTIVE.reset(token)


def assemble(item: PlannedPieces) -> torch.Tensor:
    """``item``'s whole tensor, built from its pieces in the active assembler's buffer."""
    if item.stream is None:
        return item.produce()
    return fill(_active().buffer(tuple(item.shape), item.dtype), item.stream())


def fill(out: torch.Tensor, pieces: Iterator[torch.Tensor]) -> torch.Tensor:
    """Copy consecutive flat ``pieces`` into ``out`` (contiguous); returns ``out``.

    Raises:
        RuntimeError: the pieces do not add up to ``out``'s size.
    """
    flat = out.view(-1)
    position = 0
    for piece in pieces:
        count = piece.numel()
        flat[position : position + count] = piece.reshape(-1)
        position += count
    if position != flat.numel():
        raise RuntimeError(f"pieces of {position} values for a tensor of {flat.numel()}")
    return out


def settle_working_set(nbytes: int) -> None:
    """The tensor being produced in this thread holds ``nbytes`` of working set from now on, less
    than the estimate its production was admitted with (fastsave.memory.ByteBudget.settle): the
    difference may hold pieces waiting for the writer instead. Outside a save, nothing."""
    budget = _active().budget
    if budget is not None:
        budget.settle(nbytes)


def block_bytes() -> int:
    """float32 bytes of one row block for the tensor being produced in this thread."""
    return _active().block_bytes


def device_budget() -> DeviceBudget:
    """The VRAM budget of the save producing in this thread."""
    return _active().device_budget


def block_bytes_for(allowance: int) -> int:
    """The row-block size an allowance affords: an eighth of it (a block's copies and the pieces
    waiting for the writer), between :data:`MIN_BLOCK_BYTES` and :data:`BLOCK_BYTES`."""
    return max(MIN_BLOCK_BYTES, min(BLOCK_BYTES, allowance // 8))


def scratch_buffer(
    shape: tuple[int, ...], dtype: torch.dtype
) -> contextlib.AbstractContextManager[torch.Tensor]:
    """A buffer for a one-time computation (an exactness check's reference product) while the
    block runs (:meth:`Assembler.check_buffer`): counted in the save's memory budget, or kept
    beside it, or spilled, whatever the allowance for whole tensors (it would only add to the
    save's peak)."""
    return _active().check_buffer(shape, dtype)


def spilled_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A buffer from the active assembler (in memory, or spilled when too big for the budget)."""
    return _active().buffer(shape, dtype)
