"""The ranks that take part in one save, and the few points where they meet.

A save is either *solo* (one process does everything: every ordinary save, also a model saved on
one rank of a training job whose weights are whole there) or *collective*: every rank of the
default process group calls it, the ranks walk the same plan, each writes the shards assigned to
it, and rank 0, the *publisher*, takes the directory's lock, makes the staging directory, writes
the index, config and tokenizer files and publishes. A :class:`SaveTeam` of one is the solo save:
every method below then does what a single process does, with no process group needed, and an
error is raised as it is.

Where the ranks meet, in this order (fastsave.pipeline.run.run_save):

1. :meth:`SaveTeam.roll_call`: every rank arrived (a save called on rank 0 only is refused with a
   message instead of hanging in the first gather);
2. :meth:`SaveTeam.staging`: rank 0 preflights and makes the staging directory, the others receive
   its path (and check they see it: the ranks must share a filesystem);
3. the plan, built by every rank for itself, then :meth:`SaveTeam.check_same` on its signature;
4. the shards, written rank by rank (fastsave.pipeline.write.write_merged_weights), with :meth:`SaveTeam.agree`
   at every shard boundary and at the end;
5. rank 0 publishes, and :meth:`SaveTeam.outcome` tells every rank how that went.

A rank that fails keeps meeting the others until the next :meth:`SaveTeam.agree`, where every rank
raises: the failing rank its own error, the others :class:`RankFailedError` naming it. A rank
that dies makes the next meeting fail on the others (the process group notices a closed
connection at once, a hung rank at its timeout). Nothing is published in either case: rank 0 only
publishes after everyone agreed that every shard is written.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from fastsave.errors import CollectiveCallError, RankLostError
from fastsave.parallel import ranks
from fastsave.parallel.ranks import RankFailedError

T = TypeVar("T")

# How long the ranks wait for each other to arrive at a collective save (seconds; the environment
# variable FASTSAVE_ROLL_CALL_SECONDS overrides it). The ranks of a training job reach the save
# within moments of each other; a save called on some ranks only would otherwise wait in its first
# gather until the process group's timeout (30 minutes by default).
ROLL_CALL_SECONDS = 120.0
_save_counter = itertools.count()  # the n-th collective save of this process: the same n on every rank


@dataclass(frozen=True)
class SaveTeam:
    """The ranks of one save: ``rank`` of ``world``; ``local_world`` of them on this machine."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def solo(cls) -> SaveTeam:
        """One process does the whole save (no process group is used, even where one exists)."""
        return cls()

    @classmethod
    def of_process_group(cls) -> SaveTeam:
        """Every rank of the default process group (solo without one). Not collective.

        The ranks on this machine share its memory: ``LOCAL_WORLD_SIZE`` (set by torchrun and
        accelerate) says how many there are; without it every rank is assumed to be on this machine.
        """
        if not ranks.is_distributed():
            return cls()
        world = ranks.world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return cls(ranks.rank(), world, max(1, min(local, world)))

    @property
    def collective(self) -> bool:
        """More than one rank takes part."""
        return self.world > 1

    @property
    def publisher(self) -> bool:
        """This rank preflights, writes the index and small files, and publishes (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ meetings

    def roll_call(self, what: str) -> None:
        """Wait (at most ``FASTSAVE_ROLL_CALL_SECONDS``) until every rank has called the save.

        Raises:
            CollectiveCallError: some ranks did not call it in time (named).
        """
        if not self.collective:
            return
        from torch.distributed import distributed_c10d

        store = getattr(distributed_c10d, "_get_default_store", lambda: None)()
        number = next(_save_counter)
        if store is None:  # pragma: no cover - every torch with FSDP2 has it
            return
        keys = [f"fastsave/roll-call/{number}/{r}" for r in range(self.world)]
        seconds = float(os.environ.get("FASTSAVE_ROLL_CALL_SECONDS", ROLL_CALL_SECONDS))
        store.set(keys[self.rank], "here")
        try:
            store.wait(keys, timedelta(seconds=seconds))
        except Exception:
            present = [r for r, key in enumerate(keys) if store.check([key])]
            absent = [r for r in range(self.world) if r not in present]
            raise CollectiveCallError(
                f"{what} must be called on every rank of the process group (all {self.world} ranks: the model "
                f"is sharded across them and every rank holds part of every weight), but after "
                f"{seconds:.0f} s only rank(s) {present} had called it, not {absent}. Call it on every "
                "rank, outside any `if is_main_process:` block (is_main_process=False ranks take part and "
                "write no small files). Nothing was written."
            ) from None

    def agree(self, error: BaseException | None, what: str = "the save") -> None:
        """Every rank says whether its work so far succeeded; if any failed, every rank raises.

        The failing rank raises its own ``error`` (with a note naming the other failed ranks), every
        other rank :class:`RankFailedError` naming each failing rank and its message. Solo: raises
        ``error`` itself.

        Raises:
            RankLostError: another rank did not answer (it died).
        """
        if not self.collective:
            if error is not None:
                raise error
            return
        messages = _meeting(lambda: ranks.all_gather_objects(_describe(error) if error is not None else None))
        failed = {r: message for r, message in enumerate(messages) if message is not None}
        if not failed:
            return
        if error is not None:
            others = {r: m for r, m in failed.items() if r != self.rank}
            if hasattr(error, "add_note"):
                error.add_note(
                    f"(rank {self.rank} of {self.world}; nothing was published"
                    + (f"; also failed: {others})" if others else ")")
                )
            raise error
        raise RankFailedError(what, failed, self.world)

    def check_same(self, value: Any, what: str) -> None:
        """Refuse on every rank unless every rank computed the same ``value`` (only a hash travels).

        Raises:
            RanksDisagreeError: the ranks differ (which agree with which).
        """
        if self.collective:
            _meeting(lambda: ranks.check_same_on_all_ranks(value, what))

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (small, picklable), by rank."""
        if not self.collective:
            return [value]
        return _meeting(lambda: ranks.all_gather_objects(value))

    def outcome(self, error: BaseException | None, what: str) -> None:
        """Rank 0 says how its step went (``error`` on rank 0; ignored elsewhere); others raise if it failed."""
        if not self.collective:
            if error is not None:
                raise error
            return
        message = _meeting(
            lambda: ranks.broadcast_from_rank0(_describe(error) if error is not None else None)
        )
        if self.publisher and error is not None:
            raise error
        if message is not None:
            raise RankFailedError(what, {0: message}, self.world)

    def everyone(self, work: Callable[[], T], what: str) -> T:
        """Run ``work`` on every rank; if it fails anywhere, every rank raises (solo: its error as it is)."""
        failure = ranks.LocalFailure()
        result = None
        with failure.capture():
            result = work()
        self.agree(failure.error, what)
        return result  # type: ignore[return-value]

    def on_publisher(self, work: Callable[[], T], what: str) -> T | None:
        """Rank 0 runs ``work`` (the small files, the switch, the upload); every rank learns whether
        it failed and raises if so. Returns ``work``'s result on rank 0, None elsewhere."""
        failure = ranks.LocalFailure()
        result = None
        if self.publisher:
            with failure.capture():
                result = work()
        self.outcome(failure.error, what)
        return result

    def share_from_publisher(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.collective:
            return value
        return _meeting(lambda: ranks.broadcast_from_rank0(value))

    def assign(self, sizes: Sequence[int]) -> list[int]:
        """The rank that writes each shard (``sizes`` in bytes, plan order): balanced by bytes."""
        return ranks.assign_by_bytes(list(sizes), self.world)

    @contextmanager
    def staging(self, make: Any, what: str = "preparing the save directory") -> Iterator[Path]:
        """The staging directory every rank writes into: made by rank 0 with ``make`` (a context manager).

        Rank 0 enters ``make`` (the preflight: checks, lock, staging directory); its path, or its
        error, reaches every rank; every other rank checks that it sees the directory (the ranks must
        share the filesystem). After an error the ranks meet once more on the way out, so that rank 0
        removes the staging directory only once no rank writes into it.

        Raises:
            whatever the preflight raised on rank 0 (RankFailedError on the others); the error of a
            rank that cannot see the staging directory (RankFailedError on the others).
        """
        if not self.collective:
            with make as directory:
                yield directory
            return
        if not self.publisher:
            self.outcome(None, what)
            directory = Path(self.share_from_publisher(None))
            self.agree(None if directory.is_dir() else _not_shared(directory, self.rank), what)
            try:
                yield directory
            except Exception:
                self._settle()
                raise
            return
        try:
            directory = make.__enter__()
        except BaseException as error:
            self.outcome(error, what)  # raises it here, and RankFailedError on the others
            raise
        try:
            self.outcome(None, what)
            self.share_from_publisher(str(directory))
            self.agree(None, what)
            yield directory
        except BaseException as error:
            if isinstance(error, Exception):
                self._settle()
            if not make.__exit__(type(error), error, error.__traceback__):
                raise
        else:
            make.__exit__(None, None, None)

    def _settle(self) -> None:
        """After an error: wait until every rank stopped writing (a dead rank ends the wait at once)."""
        with suppress(RankLostError):
            _meeting(ranks.barrier)


def _not_shared(path: Path, rank: int) -> OSError:
    return FileNotFoundError(
        f"rank {rank} does not see the staging directory {path} that rank 0 made: every rank of a "
        "collective save writes its shards there, so save_directory must be on a filesystem all ranks "
        "share (or run the save on one machine)"
    )


def _describe(error: BaseException) -> str:
    message = str(error).strip() or "(no message)"
    return f"{type(error).__name__}: {message}"


def _meeting(call: Any) -> Any:
    """Run a collective; a failure of the collective itself means another rank is gone."""
    try:
        return call()
    except (RankFailedError, ranks.RanksDisagreeError):
        raise
    except RuntimeError as error:  # gloo / nccl: connection closed, timeout, ...
        raise RankLostError(
            f"another rank of the save stopped answering ({error}); it was killed or crashed, or it never "
            "reached this point. Nothing was published; the next save into the directory removes what "
            "this one left."
        ) from error
