"""The few torch.distributed operations a save run on every rank needs, and nothing home-made.

A collective save (every rank of an FSDP or DeepSpeed job calls it) needs to know who it is, to
wait for the others, to share a small value (the staging path) from rank 0, to split the shards
among the ranks, and above all to fail together: a rank that fails must make every rank fail
with its error, so that rank 0 never publishes a checkpoint that another rank did not finish.

Every function works without a process group too (a plain single-process save): rank 0 of a
world of 1, where the collectives are no-ops. The transport is torch.distributed's own (gloo on
CPU, nccl on GPUs); a rank that dies mid-collective is detected by the process group (a closed
connection, or the group's timeout), which raises on the surviving ranks instead of hanging.

Rule for callers: every rank calls the collectives here in the same order, the same number of
times. A rank whose local work failed must still reach the next :func:`agree_or_raise` (use
:class:`LocalFailure` to hold the error until then) instead of leaving the others waiting.
"""

from __future__ import annotations

import hashlib
import heapq
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fastsave.errors import RankFailedError, RanksDisagreeError

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a default torch.distributed process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def _object_device() -> torch.device | None:
    """The device nccl needs object collectives staged on; None lets torch pick (gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def broadcast_from_rank0(value: T) -> T:
    """Return rank 0's ``value`` on every rank (a small picklable object, e.g. the staging path).

    Every rank must call it; the values passed on other ranks are ignored.
    """
    if not is_distributed():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (small and picklable), indexed by rank, on every rank."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _describe(error: BaseException) -> str:
    message = str(error).strip() or "(no message)"
    return f"{type(error).__name__}: {message}"


def agree_or_raise(error: BaseException | None, what: str = "the save") -> None:
    """Collectively check that every rank succeeded; if any failed, raise on every rank.

    Each rank passes the exception its local work raised, or None. When all passed None this
    returns on every rank. Otherwise every rank raises :class:`RankFailedError` naming each
    failing rank and its message (a failing rank chains its own exception as the cause).

    Must be called by every rank, in the same place of the save; it is the point before which
    nothing may be published.
    """
    failures = all_gather_objects(None if error is None else _describe(error))
    failed = {r: message for r, message in enumerate(failures) if message is not None}
    if failed:
        raise RankFailedError(what, failed, len(failures)) from error


class LocalFailure:
    """Holds the first exception of a rank's local work until the ranks next agree.

    A rank that fails while writing its shard must keep taking part in the collectives the
    other ranks are in (gathers of the modules still to come), or they wait for it until the
    process group times out. Wrap each piece of local work in :meth:`capture`, skip local work
    once :attr:`error` is set, and hand :attr:`error` to the next agreement of the ranks
    (``SaveTeam.agree``, or :func:`agree_or_raise`).
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Run the block; an ``Exception`` it raises is kept (the first one) instead of propagating.

        KeyboardInterrupt and SystemExit still propagate: the process is being stopped.
        """
        try:
            yield
        except Exception as exc:
            if self.error is None:
                self.error = exc


def digest(value: Any) -> str:
    """A short stable hash of a picklable value (used to compare plans across ranks cheaply)."""
    return hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()[:16]


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise :class:`RanksDisagreeError` on every rank unless ``value`` is identical on all ranks.

    Only a hash of ``value`` travels. Use it for things each rank computes for itself and that
    must match: the plan's order of tensors, the module walk, the shard assignment.
    """
    hashes = all_gather_objects(digest(value))
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hashes):
            groups.setdefault(h, []).append(r)
        listing = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise RanksDisagreeError(
            f"{what} differs between ranks ({listing} agree among themselves). Every rank must build "
            "the same model (same config, same adapters, same wrapping) and call the save with the "
            "same arguments."
        )


def assign_by_bytes(sizes: Sequence[int], world: int) -> list[int]:
    """Give each shard (``sizes[i]`` bytes, in plan order) to a rank, balancing bytes per rank.

    Largest shards first, each to the rank with the fewest bytes so far (ties: the lower rank;
    equal sizes: the earlier shard first), so the result depends only on ``sizes`` and ``world``
    and every rank computes the same assignment. Equal-sized shards, the usual case when a model
    fills ``max_shard_size``, go round-robin in plan order (0, 1, ..., 0, 1, ...), which keeps
    every rank busy while the ranks walk the modules together. The most-loaded rank carries at
    most 4/3 of the optimum (longest-processing-time bound).

    Returns ``owner``: ``owner[i]`` is the rank that writes shard ``i``.
    """
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if any(int(s) != s or s < 0 for s in sizes):
        raise ValueError(f"shard sizes must be non-negative integers, got {list(sizes)}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    loads = [(0, r) for r in range(world)]  # a heap of (bytes so far, rank)
    owner = [0] * len(sizes)
    for i in order:
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + int(sizes[i]), r))
    return owner
