"""The memory bound's pieces: the byte semaphore between producer and writer, the limit, the spill."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time

import pytest
import torch
from process_maps import mapping_at

from fastsave.memory import ByteBudget, MemoryBudget, anonymous_memory, memory_limit
from fastsave.merge.assemble import Assembler, assembling, spilled_buffer


def test_byte_budget_bounds_what_is_held_and_never_deadlocks():
    """A producer reserving working sets and queueing pieces, a consumer giving them back: what is held
    never passes the limit except for one request larger than the limit, which then runs alone."""
    budget = ByteBudget(limit=1000)
    rng = random.Random(0)
    queue: list[int] = []
    lock = threading.Condition()
    done = threading.Event()
    seen_over = []

    def consumer():
        while not (done.is_set() and not queue):
            with lock:
                if not queue:
                    lock.wait(timeout=0.01)
                    continue
                size = queue.pop(0)
            budget.release(size)

    thread = threading.Thread(target=consumer)
    thread.start()
    for _ in range(300):
        working = rng.choice([0, 100, 400, 1500])  # 1500: more than the whole limit
        assert budget.reserve(working)
        for _ in range(rng.randint(1, 5)):
            piece = rng.choice([10, 200, 700])
            assert budget.acquire(piece)
            held = budget.reserved + budget.held
            if held > budget.limit:
                seen_over.append((working, piece, held))
                assert budget.held == piece  # only when nothing else waited: it runs alone
            with lock:
                queue.append(piece)
                lock.notify()
        budget.unreserve()
    done.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert budget.held == 0 and budget.reserved == 0
    # the working sets larger than the limit did run (alone, as asserted above); none hung
    assert any(working == 1500 for working, _, _ in seen_over), seen_over


def test_a_stopped_save_does_not_wait_forever():
    budget = ByteBudget(limit=10)
    assert budget.acquire(8)
    stop = threading.Event()
    stop.set()
    assert budget.acquire(8, stop) is False  # would wait for the writer, but the save is stopping


def test_a_working_set_settled_lower_frees_room_for_waiting_pieces_and_never_grows():
    """A tensor admitted with a larger estimate than its merge needs settles to what it holds: a
    piece waiting for room is admitted at once; a settle above the reservation changes nothing."""
    budget = ByteBudget(limit=1000)
    assert budget.reserve(600)
    assert budget.acquire(300)
    admitted = threading.Event()

    def producer() -> None:
        assert budget.acquire(300)  # 600 + 300 + 300 > 1000: waits
        admitted.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not admitted.wait(0.2)
    budget.settle(350)  # 350 + 300 + 300 <= 1000
    assert admitted.wait(5)
    thread.join(timeout=5)
    assert (budget.reserved, budget.held) == (350, 600)
    budget.settle(900)
    assert budget.reserved == 350
    budget.unreserve()
    assert budget.reserved == 0


def test_limit_and_allowance():
    limit = memory_limit()
    assert 0 < limit <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = MemoryBudget(0.5)
    assert budget.limit == int(limit * 0.5)
    before = anonymous_memory()
    # 64 MiB of fresh anonymous pages, written: resident. A private mapping of its own, not
    # torch.ones: malloc may serve that from a free heap chunk that earlier tests left resident,
    # and RssAnon then does not grow (it failed so in a clean-clone CI run). Not mmap's default
    # MAP_SHARED either, whose pages count as shared memory, not RssAnon.
    block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.write(b"\x01" * len(block))
    grown = anonymous_memory() - before
    block.close()
    assert 60 * 2**20 <= grown <= 80 * 2**20, grown
    tiny = MemoryBudget(1e-9)  # below what the process holds: the smallest working set, no error
    assert tiny.minimal and tiny.allowance > 0


def test_spilled_buffer_is_a_deleted_file_mapping(tmp_path):
    """Beyond the allowance a buffer is a shared mapping of an unlinked file: page cache, not anonymous
    memory, and nothing left in the directory even if the process died now."""
    spill = tmp_path / "spill"
    with assembling(Assembler(spill, allowance=1024)):
        small = spilled_buffer((16,), torch.float32)  # 64 bytes: in memory
        big = spilled_buffer((1024, 256), torch.bfloat16)  # 512 KiB: spilled
    big.fill_(1.5)
    assert float(big.float().sum()) == 1.5 * big.numel()
    assert list(spill.iterdir()) == []
    spilled, kept = mapping_at(big.data_ptr()), mapping_at(small.data_ptr())
    assert spilled is not None and str(spill) in spilled[2] and "(deleted)" in spilled[2]
    assert kept is None or str(spill) not in kept[2]


def test_block_size_follows_the_allowance():
    from fastsave.merge.assemble import BLOCK_BYTES, MIN_BLOCK_BYTES, block_bytes_for

    assert block_bytes_for(10 * 2**30) == BLOCK_BYTES
    assert block_bytes_for(16 * 2**20) == 2 * 2**20
    assert block_bytes_for(0) == MIN_BLOCK_BYTES


def test_exactness_check_of_a_large_delta_is_spilled_and_still_decides_right(tmp_path):
    """The row-block check needs the whole delta product once: past the allowance it goes to a
    spilled file, and blocks of it still equal torch's own product bit for bit."""
    from fastsave.merge import row_blocks

    generator = torch.Generator().manual_seed(0)
    b = torch.randn(4099, 16, generator=generator)
    a = torch.randn(16, 1000, generator=generator)
    assembler = Assembler(tmp_path, allowance=2**20, block_bytes=2**18)
    with assembling(assembler):
        exact = row_blocks.blockwise_product_is_exact(b, a, 65)
    assert assembler.spilled_bytes == 4099 * 1000 * 4
    full = b @ a
    assert exact == all(torch.equal(full[i : i + 65], b[i : i + 65] @ a) for i in range(0, 4099, 65))


def test_exactness_checks_keep_their_reference_in_one_buffer_and_decide_as_torch_does(tmp_path):
    """Within its check allowance a check's whole product stays in memory, in one buffer that every
    check of the save reuses (grown to the largest; nothing spilled), and each decision (rows or
    columns, one block or many) is what torch's own products say, each block from fresh memory."""
    from fastsave.merge import row_blocks
    from fastsave.merge.assemble import scratch_buffer

    generator = torch.Generator().manual_seed(1)
    assembler = Assembler(tmp_path / "spill", allowance=2**20, block_bytes=2**18, check_allowance=64 * 2**20)
    cases = [(2051, 700, 48, False), (300, 1500, 112, True), (40, 900, 64, False), (900, 40, 64, True)]
    with assembling(assembler):
        for rows, cols, step, columns in cases:
            b = torch.randn(rows, 16, generator=generator)
            a = torch.randn(16, cols, generator=generator)
            row_blocks._exact_shapes.clear()
            exact = row_blocks.blockwise_product_is_exact(b, a, step, columns)
            full = b @ a
            if columns:
                expected = all(
                    torch.equal(full[:, i : i + step], b @ a[:, i : i + step]) for i in range(0, cols, step)
                )
            else:
                expected = all(
                    torch.equal(full[i : i + step], b[i : i + step] @ a) for i in range(0, rows, step)
                )
            assert exact == expected, (rows, cols, step, columns)
        with scratch_buffer((2051, 700), torch.float32) as largest:
            pass
        with scratch_buffer((300, 1500), torch.float32) as smaller:
            assert smaller.data_ptr() == largest.data_ptr()
        with scratch_buffer((3000, 3000), torch.float32) as grown:  # 36 MB: the buffer grows
            assert grown.shape == (3000, 3000)
        with scratch_buffer((10, 10), torch.float32) as small:
            assert small.data_ptr() == grown.data_ptr()
        with scratch_buffer((5000, 5000), torch.float32) as spilled:  # 100 MB: past the check allowance
            assert spilled.shape == (5000, 5000)
    assert assembler.spilled_bytes == 5000 * 5000 * 4
    row_blocks._exact_shapes.clear()


def test_an_exactness_check_within_the_budget_waits_for_room_and_gives_it_back(tmp_path):
    """A check's whole product that fits the save's byte budget is counted in it while the check
    runs: it waits until written pieces make room (never spilled, never kept), gives the bytes
    back after, and a stopped save does not wait for room that will not come."""
    from fastsave.errors import SaveStopped
    from fastsave.merge import row_blocks
    from fastsave.merge.assemble import scratch_buffer

    budget = ByteBudget(2**20)
    stop = threading.Event()
    assembler = Assembler(tmp_path / "spill", allowance=2**20, block_bytes=2**18, budget=budget, stop=stop)
    assert budget.acquire(700 * 2**10)  # a piece waiting for the writer
    released = threading.Event()

    def writer() -> None:
        time.sleep(0.2)
        released.set()
        budget.release(700 * 2**10)

    threading.Thread(target=writer).start()
    generator = torch.Generator().manual_seed(2)
    b, a = torch.randn(400, 16, generator=generator), torch.randn(16, 500, generator=generator)  # 800 KB
    seen = []
    with assembling(assembler):
        with scratch_buffer((400, 500), torch.float32) as reference:
            seen.append((released.is_set(), budget.reserved, reference.shape))
        row_blocks._exact_shapes.clear()
        exact = row_blocks.blockwise_product_is_exact(b, a, 64)
    assert seen == [(True, 400 * 500 * 4, (400, 500))]
    assert budget.reserved == 0 and budget.held == 0 and assembler.spilled_bytes == 0
    full = b @ a
    assert exact == all(torch.equal(full[i : i + 64], b[i : i + 64] @ a) for i in range(0, 400, 64))
    assert budget.acquire(700 * 2**10)
    stop.set()
    with assembling(assembler), pytest.raises(SaveStopped), scratch_buffer((400, 500), torch.float32):
        pass
    row_blocks._exact_shapes.clear()


def test_check_allowance_is_a_32nd_of_the_output_and_none_when_minimal():
    from fastsave.memory import CHECK_SHARE

    assert CHECK_SHARE == 32
    roomy = MemoryBudget(0.5, output_bytes=2**30)
    assert roomy.check_allowance == 2**30 // 32  # the test machine has gigabytes of headroom
    assert MemoryBudget(0.5).check_allowance == 0  # nothing to write, nothing kept
    tiny = MemoryBudget(1e-9, output_bytes=2**30)
    assert tiny.minimal and tiny.check_allowance == 0


def test_vram_budget_is_a_fraction_of_the_free_memory_read_once(monkeypatch):
    """The VRAM allowance is maximum_memory_usage of what the device reported free the first time it
    was asked, and device blocks are sized so that the blocks in flight fit it (and the host's share)."""
    import torch

    from fastsave import vram

    asked = []

    def reported_free(device):
        asked.append(device)
        return 600 * 2**20 if device.type == "cuda" else None

    monkeypatch.setattr(vram, "free_device_memory", reported_free)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    budget = vram.DeviceBudget(0.5, host_block_bytes=64 * 2**20)
    assert budget.allowance(gpu) == 300 * 2**20
    assert budget.block_bytes(gpu) == vram.DEVICE_BLOCK_BYTES  # 16 MiB x 3 in flight is far below 300 MiB
    assert budget.fits_whole(gpu, 300 * 2**20) and not budget.fits_whole(gpu, 300 * 2**20 + 1)
    assert asked == [gpu]  # read once, kept
    small = vram.DeviceBudget(0.01, host_block_bytes=64 * 2**20)  # 6 MiB allowed
    assert small.block_bytes(gpu) == 6 * 2**20 // (2 * vram.BLOCKS_IN_FLIGHT)
    assert vram.DeviceBudget(0.5, host_block_bytes=2**20).block_bytes(gpu) == 2**20  # the host's share
    assert budget.allowance(cpu) is None and budget.fits_whole(cpu, 2**40)  # no bound off a GPU


def test_row_blocks_are_multiples_of_16_rows_and_give_the_whole_products_bits():
    """Blocks of 146 rows (2 MiB of a 3584-wide float32 weight) once gave other bits than the whole
    rank-16 product under MKL, and such weights fell back to the whole-matrix merge: the blocks are
    now multiples of 16 rows, checked here against torch's own whole product."""
    from fastsave.merge.row_blocks import BLAS_ROWS, rows_per_block

    assert rows_per_block(3584, 1, 2 << 20) == 144 and rows_per_block(3072, 1, 4 << 20) == 336
    assert rows_per_block(3584, 32, 2 << 20) == 128  # the reader's alignment and 16 both
    assert (
        rows_per_block(30000, 1, 2 << 20) == 16 and rows_per_block(40000, 1, 2 << 20) == 13
    )  # fewer: as they come
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((1024, 3584), (3072, 3072), (1024, 3072)):
        b = torch.randn(rows, 16, generator=generator)
        a = torch.randn(16, cols, generator=generator)
        step = rows_per_block(cols, 1, 2 << 20)
        assert step % BLAS_ROWS == 0
        full = b @ a
        assert all(torch.equal(full[i : i + step], b[i : i + step] @ a) for i in range(0, rows, step))


def test_same_bits_tells_the_sign_of_zero_apart_and_a_nan_from_nothing():
    from fastsave.dtypes import same_bits

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        zeros = torch.zeros(4, dtype=dtype)
        assert torch.equal(zeros, -zeros) and not same_bits(zeros, -zeros)  # torch.equal says equal
        nan = torch.full((4,), float("nan"), dtype=dtype)
        assert not torch.equal(nan, nan.clone()) and same_bits(nan, nan.clone())
        assert not same_bits(zeros, zeros[:3]) and not same_bits(
            zeros, zeros.to(torch.float32 if dtype != torch.float32 else torch.float64)
        )


def test_a_block_product_whose_zeros_have_the_other_sign_fails_the_row_block_check(monkeypatch):
    """Blocks that equal the whole product as numbers but not as bits (a -0.0 where the whole has
    0.0, which W + delta can keep) fail the check: the row merge then reads its blocks from the
    whole product (tests/test_product_blocks.py)."""
    from patch_sites import blas_blocks_with_negative_zeros

    from fastsave.merge import row_blocks

    generator = torch.Generator().manual_seed(2)
    b = torch.randn(96, 16, generator=generator)
    b[5] = 0.0  # a zero row: +0.0 all along that row of the whole product
    a = torch.randn(16, 64, generator=generator).abs()
    blas_blocks_with_negative_zeros(monkeypatch, (96, 64))
    row_blocks._exact_shapes.clear()
    try:
        assert not row_blocks.blockwise_product_is_exact(b, a, 32)
    finally:
        row_blocks._exact_shapes.clear()


def test_what_may_wait_is_a_48th_of_the_output_or_a_32nd_up_to_32_mib():
    from fastsave.memory import in_flight_bytes

    mib = 2**20
    assert in_flight_bytes(0) == in_flight_bytes(513 * 10**6) == 24 * mib  # 250M: at least 24 MiB
    assert in_flight_bytes(988_098_304) == 988_098_304 // 32  # Qwen2.5-0.5B's shape: 31 MiB
    assert in_flight_bytes(1536 * mib) == 32 * mib  # where the two meet
    assert in_flight_bytes(3072 * mib) == 64 * mib  # past it, a 48th
    assert in_flight_bytes(2 * 10**9) == 2 * 10**9 // 48
    assert in_flight_bytes(10**12) == 512 * mib
    budget = MemoryBudget(0.5, output_bytes=988_098_304)  # gigabytes of headroom here
    assert budget.allowance == 988_098_304 // 32
