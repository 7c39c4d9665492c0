"""The writer: the producer's pieces streamed into safetensors shards in the staging directory."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastsave.io.direct_file import joined_write_bytes, write_buffers
from fastsave.io.disk_space import check_free_space
from fastsave.io.shards import ShardWriter, assign_shards, data_offsets, write_index
from fastsave.io.staging import PendingSave
from fastsave.memory import ByteBudget, MemoryBudget, remove_spill_directory, spill_directory
from fastsave.merge.assemble import Assembler, block_bytes_for
from fastsave.merge.host_copies import release_cached_pinned_memory
from fastsave.options import SaveOptions
from fastsave.parallel.ranks import LocalFailure
from fastsave.parallel.team import SaveTeam
from fastsave.pipeline.producer import DONE, END, Agreed, produce_into
from fastsave.pipeline.schedule import schedule
from fastsave.plan.items import Plan
from fastsave.threads import save_thread_stacks
from fastsave.vram import DeviceBudget

logger = logging.getLogger(__name__)


@save_thread_stacks()  # a new context for each call
def write_merged_weights(
    plan: Plan,
    directory: Path,
    options: SaveOptions,
    team: SaveTeam | None = None,
    pending: PendingSave | None = None,
    on_shard_done: Callable[[Path], None] | None = None,
) -> list[str]:
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names.

    ``on_shard_done``: called with each shard's path as soon as it is complete on disk (fsynced,
    its digest in its header), before the next shard is begun (an upload shard by shard).

    The threads it starts (producer, hashing, the producer's OpenMP team) reserve small stacks
    (fastsave.threads): under a tight memory cap their default 8 MiB reservations, which
    RLIMIT_DATA counts, failed a save that had room for its data.

    The disk-space check runs first, before any tensor is merged. A producer thread computes the
    tensors' pieces ahead of the writer, as far as ``maximum_memory_usage`` allows
    (fastsave.memory): pieces waiting for the writer and the working memory of the tensor being
    merged are admitted by bytes; a tensor needed whole beyond the allowance is spilled to disk
    (fastsave.merge.assemble).

    ``pending``: the pending save on the rank that publishes, which checks the disk space for the
    planned bytes (None: only ``directory``'s free space is checked).

    ``team``: in a collective save (fastsave.parallel.team) every rank calls this with the same
    plan; each writes the shards assigned to it (balanced by bytes) and rank 0 the index, with the
    checksums every rank computed. The memory allowance is shared by the ranks on one machine.

    Raises:
        DiskSpaceError: the checkpoint does not fit (nothing written), or the disk filled up.
        NonFiniteError: a tensor holds NaN/Inf (naming it).
        RankFailedError: another rank failed (naming it and its error).
    """
    team = team or SaveTeam.solo()
    shards = assign_shards(plan.items, options.max_shard_size, options.safe_serialization, options.variant)
    owners = team.assign([shard.nbytes for shard in shards])
    mine = [shard for shard, owner in zip(shards, owners, strict=True) if owner == team.rank]
    space_error = None
    if team.publisher:
        try:
            if pending is not None:
                pending.check_space(plan.total_bytes, len(shards))
            else:
                check_free_space(directory, plan.total_bytes, len(shards))
        except Exception as error:
            space_error = error
    team.agree(space_error, "checking the disk space")
    my_bytes = sum(shard.nbytes for shard in mine)
    memory = MemoryBudget(options.maximum_memory_usage, team.local_world, my_bytes)
    buffer_bytes, depth, buffers_paid = write_buffers(memory.allowance, memory.minimal, my_bytes)
    writer = ShardWriter(
        directory,
        mine,
        options.safe_serialization,
        index=False,
        on_shard_done=on_shard_done,
        buffer_bytes=buffer_bytes,
        depth=depth,
        joined_bytes=joined_write_bytes(memory.allowance, memory.minimal),
    )
    # the writer's buffers (all of them in a tight budget, else what they hold beyond 4 MiB) are paid
    # out of what may wait for it
    budget = ByteBudget(memory.allowance - buffers_paid)
    spill = spill_directory(options.temporary_location, directory, team.rank if team.collective else None)
    # device blocks reach the host as pinned copies: a few of them and the pieces waiting must fit
    # the RAM allowance too
    device_memory = DeviceBudget(options.maximum_memory_usage, host_block_bytes=memory.allowance // 8)
    sink: queue.Queue = queue.Queue()  # bounded by the byte budget, not by a count
    stop = threading.Event()
    assembler = Assembler(
        spill,
        memory.whole_allowance,
        block_bytes_for(memory.allowance),
        device_memory,
        check_allowance=memory.check_allowance,
        budget=budget,
        stop=stop,
    )
    failure = LocalFailure()
    steps = schedule(plan, shards, owners, team.rank)
    progress = tqdm(
        total=sum(shard.nbytes for shard in mine),
        unit="B",
        unit_scale=True,
        desc="fastsave: merging",
        leave=False,
        disable=not team.publisher,
    )
    writing = _WriterThread(sink, writer, budget, progress, stop, failure, team.collective)
    writing.start()
    interrupted: BaseException | None = None
    try:
        # the producer runs in the calling thread and the writer beside it, not the other way round:
        # libgomp throttles the spinning of torch's OpenMP workers as soon as the threads of all teams
        # outnumber the cores, and a producer on a second thread (a second team) ran its many short
        # kernels 2.4x slower on 2 cores. The writer's thread runs no parallel torch kernel.
        produce_into(steps, plan, budget, assembler, sink, stop, team, failure, data_offsets(mine))
    except BaseException as error:  # produce_into hands its errors over; an interrupt may land here
        interrupted = error
        sink.put(error)
    sink.put(DONE)  # the writer ends here, unless an error or DONE reached it first
    while writing.is_alive():  # never leave it writing into a staging directory about to go
        try:
            writing.join()
        except BaseException as error:  # Ctrl-C while waiting: the writer stops at it
            interrupted = interrupted or error
            stop.set()
            sink.put(error)
    progress.close()
    stop.set()
    remove_spill_directory(assembler.spill_directory)
    release_cached_pinned_memory()
    error = writing.error or interrupted
    if error is None:
        try:
            writer.close()
        except BaseException:
            writer.abort()
            raise
    else:
        writer.abort()
        if isinstance(error, Agreed):
            raise error.error from None
        if team.collective and isinstance(error, Exception):
            # this rank's writing failed: the producer walked the rest of the schedule taking part in
            # every gather (the other ranks need this rank there), and the ranks meet here
            _raise_agreed(sink)
            team.agree(failure.error or error, "writing the shards")
        raise error
    team.agree(None, "writing the shards")  # every rank's shards are complete (a barrier)
    if assembler.spilled_bytes:
        logger.info(
            "fastsave: %.2f GB of tensors needed whole were kept on disk (%s), not in memory",
            assembler.spilled_bytes / 1e9,
            assembler.spill_directory,
        )
    digests: dict[str, str] = {}
    for each in team.gather(writer.digests):
        digests.update(each)
    if team.publisher and len(shards) > 1:
        write_index(directory, shards, digests, options.safe_serialization)
    return [s.filename for s in shards]


class _WriterThread(threading.Thread):
    """Pieces from the producer into shards until DONE (or an error the producer handed over).

    The first error, its own or handed over, is kept in :attr:`error`; then it sets ``stop``, so
    that the producer waits for nothing, and in a collective save records its own failure, so that
    the producer walks the rest of the schedule taking part only.
    """

    def __init__(
        self,
        sink: queue.Queue,
        writer: ShardWriter,
        budget: ByteBudget,
        progress: Any,
        stop: threading.Event,
        failure: LocalFailure,
        collective: bool,
    ) -> None:
        super().__init__(daemon=True, name="fastsave-writer")
        self.sink, self.writer, self.budget, self.progress = sink, writer, budget, progress
        self.stop, self.failure, self.collective = stop, failure, collective
        self.error: BaseException | None = None

    def run(self) -> None:
        """Write until DONE; keep the first error."""
        try:
            self._write_pieces()
        except BaseException as error:  # re-raised by the thread that started the save
            self.error = error
            own = isinstance(error, Exception) and not isinstance(error, Agreed)
            if self.collective and own and self.failure.error is None:
                self.failure.error = error  # so that the producer takes part only from now on
            self.stop.set()

    def _write_pieces(self) -> None:
        while True:
            try:
                item = self.sink.get_nowait()
            except queue.Empty:
                # pieces held for a joint write go out before waiting: the producer may be waiting
                # for the bytes they hold
                self.writer.flush()
                item = self.sink.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):  # the producer's error (or the ranks' agreed one)
                raise item
            if item is END:
                self.writer.end_tensor()
                continue
            piece, nbytes = item
            # the budget gets the piece's bytes back once the writer holds it no more: when copied,
            # on return; when written from its memory, once written (on the I/O thread)
            self.writer.write_piece(piece, functools.partial(self.budget.release, nbytes))
            del piece, item
            self.progress.update(nbytes)


def _raise_agreed(sink: queue.Queue) -> None:
    """Raise the error the ranks agreed on in the producer thread, if it got that far."""
    while True:
        try:
            item = sink.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Agreed):
            raise item.error
        if isinstance(item, BaseException):  # the collectives themselves failed: no meeting is possible
            raise item
