"""The producer: each scheduled tensor's pieces in plan order, admitted by bytes.

Pieces go through a queue to the writer (fastsave.pipeline.write); the memory they and the tensor
being merged hold is admitted against the byte budget (fastsave.memory) before it is held.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping

from fastsave.buffer_pool import pooled_buffers
from fastsave.io.finite import check_finite
from fastsave.io.placement import placing
from fastsave.memory import ByteBudget
from fastsave.merge.assemble import Assembler, assembling
from fastsave.parallel.ranks import LocalFailure
from fastsave.parallel.team import SaveTeam
from fastsave.pipeline.schedule import Action, Step
from fastsave.plan.items import Plan, PlanItem

END = object()  # marks the end of one tensor's pieces in the queue
DONE = object()  # the producer went through the whole schedule


class Agreed(Exception):
    """An error every rank raises at the same meeting (the producer's agreement at a shard end)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _take_part(item: PlanItem) -> None:
    """The collectives producing ``item`` still involves on this rank, without producing it."""
    if item.group is not None:
        item.group.take_part()
    elif item.participate is not None:
        item.participate()


def produce_into(
    steps: list[Step],
    plan: Plan,
    budget: ByteBudget,
    assembler: Assembler,
    sink: queue.Queue,
    stop: threading.Event,
    team: SaveTeam,
    failure: LocalFailure,
    offsets: Mapping[int, int] | None = None,
) -> None:
    """The producer (run by the thread that saves): each scheduled tensor's pieces in plan order,
    admitted by bytes, then END; DONE after the last.

    ``offsets``: where each item's data begins in its file, by ``id`` of the item (an item's
    output blocks are then placed for the writer, fastsave.io.placement).

    An item's working memory is admitted before it is produced and given back when it is done;
    each piece is admitted before it is queued and given back when the writer has written it. The
    first error is handed to the writer thread, which ends at it (the saving thread re-raises it).

    In a collective save a rank whose work failed (here, or in the writer, which then sets
    ``stop``) keeps walking the schedule, entering only the collectives, and the ranks meet at each
    shard's end: there every rank raises (an :class:`Agreed` error) as soon as any rank failed.
    """
    try:
        # scratch buffers of block readers reuse their memory from one weight to the next
        with assembling(assembler), pooled_buffers():
            for step in steps:
                failed = failure.error is not None or stop.is_set()
                if step.action is Action.PRODUCE and not failed:
                    try:
                        offset = (offsets or {}).get(id(step.item))
                        if not _produce_one(step.item, budget, sink, stop, offset):
                            if not team.collective:
                                return
                            _take_part(step.item)  # stopped by the writer's failure
                    except Exception as error:
                        if not team.collective:
                            raise
                        failure.error = failure.error or error
                        _take_part(step.item)
                elif step.action is Action.PRODUCE:
                    if not team.collective:
                        return
                    _take_part(step.item)
                elif step.action is Action.COLLECTIVES_ONLY:
                    _take_part(step.item)
                if step.agree and team.collective:
                    try:
                        team.agree(failure.error, "writing the shards")
                    except BaseException as error:
                        sink.put(Agreed(error))
                        return
        sink.put(DONE)
    except BaseException as error:  # handed to the writer thread, which re-raises it
        sink.put(error)
    finally:
        if plan.release is not None:
            plan.release()


def _produce_one(
    item: PlanItem, budget: ByteBudget, sink: queue.Queue, stop: threading.Event, offset: int | None = None
) -> bool:
    """One tensor's pieces into ``sink``, then END; False when ``stop`` ended it early.

    Each floating piece is checked for NaN/Inf here, while it is in cache and before it is queued
    (fastsave.io.finite), and made contiguous: the writer's thread runs no torch kernel.
    ``offset``: where the item's data begins in its file (its pieces are placed for it), if known.

    Raises:
        NonFiniteError: a piece holds NaN or Inf (naming the tensor).
    """
    if not budget.reserve(item.working_set(), stop):
        return False
    try:
        with placing(offset) if offset is not None else contextlib.nullcontext() as placement:
            for piece in item.pieces():  # each piece is made inside the block: placed for its offset
                if not item.holds_codes:  # packed codes in a float dtype are not numbers
                    check_finite(piece, item.name)
                piece = piece.contiguous()
                nbytes = piece.numel() * piece.element_size()
                if placement is not None:
                    placement.advance(nbytes)
                if not budget.acquire(nbytes, stop):
                    return False
                if not _put(sink, (piece, nbytes), stop):
                    return False
                del piece
    finally:
        budget.unreserve()
    return _put(sink, END, stop)


def _put(sink: queue.Queue, value: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            sink.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
