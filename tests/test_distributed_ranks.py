"""fastsave.parallel.ranks: shard assignment, the single-process fallback, and 2-rank gloo runs.

The 2-rank tests start real processes (torch.distributed, gloo on 127.0.0.1): rank failure must
reach every rank with the failing rank named, and a rank killed mid-collective must make the
others fail instead of hang.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_harness import run_ranks, values

from fastsave.parallel import ranks
from fastsave.parallel.ranks import RankFailedError, RanksDisagreeError, assign_by_bytes

# -- assign_by_bytes (pure) -------------------------------------------------------------------


def _loads(sizes: list[int], owner: list[int], world: int) -> list[int]:
    loads = [0] * world
    for size, r in zip(sizes, owner, strict=True):
        loads[r] += size
    return loads


def test_equal_shards_go_round_robin_in_plan_order():
    assert assign_by_bytes([5] * 7, 2) == [0, 1, 0, 1, 0, 1, 0]
    assert assign_by_bytes([5] * 6, 3) == [0, 1, 2, 0, 1, 2]


def test_assignment_balances_bytes_and_gives_the_small_last_shard_to_the_lighter_rank():
    # the usual shape of a checkpoint: full shards, then a short last one
    owner = assign_by_bytes([5, 5, 5, 2], 2)
    assert owner == [0, 1, 0, 1]
    assert _loads([5, 5, 5, 2], owner, 2) == [10, 7]


def test_assignment_is_within_the_lpt_bound_of_the_optimum():
    # an exhaustive optimum on a small case with uneven sizes
    import itertools

    sizes = [9, 7, 6, 5, 5, 4, 3, 2]
    world = 3
    best = min(max(_loads(sizes, list(o), world)) for o in itertools.product(range(world), repeat=len(sizes)))
    got = max(_loads(sizes, assign_by_bytes(sizes, world), world))
    assert got <= best * (4 / 3 - 1 / (3 * world)) + 1e-9


def test_assignment_is_deterministic_and_defined_for_edge_cases():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]
    assert assign_by_bytes(sizes, 4) == assign_by_bytes(list(sizes), 4)
    assert assign_by_bytes([], 4) == []
    assert assign_by_bytes(sizes, 1) == [0] * len(sizes)
    assert sorted(set(assign_by_bytes([1, 1], 8))) == [0, 1]  # more ranks than shards: some idle
    with pytest.raises(ValueError, match="world"):
        assign_by_bytes([1], 0)
    with pytest.raises(ValueError, match="non-negative"):
        assign_by_bytes([1, -1], 2)


# -- without a process group ------------------------------------------------------------------


def test_single_process_fallback_needs_no_process_group():
    assert not dist.is_initialized()
    assert (ranks.rank(), ranks.world_size(), ranks.is_distributed()) == (0, 1, False)
    ranks.barrier()
    assert ranks.broadcast_from_rank0({"staging": "/x"}) == {"staging": "/x"}
    ranks.agree_or_raise(None)
    ranks.check_same_on_all_ranks([1, 2], "plan")
    with pytest.raises(RankFailedError, match=r"rank 0: OSError: disk full") as info:
        ranks.agree_or_raise(OSError("disk full"), "writing shards")
    assert info.value.failures == {0: "OSError: disk full"}
    assert isinstance(info.value.__cause__, OSError)


# -- 2 ranks over gloo ------------------------------------------------------------------------


def _collectives_worker(rank: int, world: int) -> dict:
    report: dict = {"rank": ranks.rank(), "world": ranks.world_size()}
    report["staging"] = ranks.broadcast_from_rank0(f"/tmp/staging-from-rank-{rank}")
    ranks.barrier()
    ranks.agree_or_raise(None, "step 1")  # all succeeded: returns everywhere
    ranks.check_same_on_all_ranks(["a", "b"], "plan order")

    # rank 1's local work fails; both ranks must raise, naming rank 1 and its message
    failure = ranks.LocalFailure()
    with failure.capture():
        if rank == 1:
            raise ValueError("shard 3 could not be written")
    try:
        ranks.agree_or_raise(failure.error, "writing shards")
    except RankFailedError as exc:
        report["failure"] = (str(exc), exc.failures, type(exc.__cause__).__name__)

    # different plans on the two ranks are refused on both
    try:
        ranks.check_same_on_all_ranks(["a", "b"] if rank == 0 else ["b", "a"], "plan order")
    except RanksDisagreeError as exc:
        report["disagree"] = str(exc)

    # both fail: both messages on both ranks
    try:
        ranks.agree_or_raise(RuntimeError(f"boom on {rank}"))
    except RankFailedError as exc:
        report["both"] = exc.failures

    # the group is still usable after all of that
    report["after"] = ranks.all_gather_objects(rank)
    return report


def test_two_ranks_share_values_and_fail_together():
    reports = values(run_ranks(_collectives_worker))
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world"]) == (rank, 2)
        assert report["staging"] == "/tmp/staging-from-rank-0"
        message, failures, cause = report["failure"]
        assert failures == {1: "ValueError: shard 3 could not be written"}
        assert "writing shards failed on 1 of 2 ranks" in message
        assert "rank 1: ValueError: shard 3 could not be written" in message
        assert "nothing was published" in message
        assert cause == ("ValueError" if rank == 1 else "NoneType")
        assert "plan order differs between ranks" in report["disagree"]
        assert report["both"] == {0: "RuntimeError: boom on 0", 1: "RuntimeError: boom on 1"}
        assert report["after"] == [0, 1]


def _killed_worker(rank: int, world: int) -> float:
    big = torch.ones(4_000_000)
    if rank == 1:
        # start the collective, then die in the middle of it
        dist.all_reduce(big, async_op=True)
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        dist.all_reduce(big)
        ranks.agree_or_raise(None)
    except Exception:
        return time.monotonic() - start
    raise AssertionError("the collective completed although rank 1 was killed")


def test_a_rank_killed_mid_collective_makes_the_others_fail_not_hang():
    # The group's timeout is longer than the harness waits: rank 0 can only come back (instead of
    # being reported hung) because gloo saw the peer's socket close, not through that timeout.
    outcomes = run_ranks(_killed_worker, pg_timeout_s=600, join_timeout_s=120)
    assert outcomes[1].error is not None and outcomes[1].error[0] == "died"
    assert outcomes[0].ok, outcomes[0].error


def _hung_worker(rank: int, world: int, released: str) -> str:
    if rank == 1:
        # alive but never joins the collective (a rank stuck in user code) until rank 0 has failed
        deadline = time.monotonic() + 90
        while not os.path.exists(released) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "released by rank 0" if os.path.exists(released) else "never released"
    try:
        ranks.agree_or_raise(None)
    except Exception as error:
        Path(released).write_text(type(error).__name__)
        return "failed while rank 1 was stuck"
    raise AssertionError("the collective completed without rank 1")


def test_a_hung_rank_makes_the_others_fail_after_the_process_group_timeout(tmp_path):
    """Rank 0 fails while rank 1 is still stuck (rank 1 leaves only once rank 0 has failed): the
    group's timeout ended the wait, not rank 1's return."""
    outcomes = run_ranks(_hung_worker, str(tmp_path / "released"), pg_timeout_s=1.0, join_timeout_s=60)
    assert values(outcomes) == ["failed while rank 1 was stuck", "released by rank 0"]
