"""Shard files written through aligned buffers (O_DIRECT where the filesystem takes it), header last.

Oracles: the bytes handed in, concatenated here; zlib's CRC-32 of them; the file as read back.
Filesystems that refuse O_DIRECT (at open, or at the first write) are produced deterministically by
failing those calls with EINVAL, whatever the filesystem under the test does.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import random
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from patch_sites import aligned_direct_writes, fail_pwrite_at
from process_maps import mapping_at

from fastsave.io import direct_file
from fastsave.io.checksums import BlockCrc32
from fastsave.io.direct_file import ALIGN, AlignedWriter

O_DIRECT = getattr(os, "O_DIRECT", 0)


def _write(
    path: Path, pieces: list[bytes], header_bytes: int = ALIGN, **sizes
) -> tuple[AlignedWriter, BlockCrc32]:
    writer = AlignedWriter(**sizes)
    checksum = BlockCrc32(block=3 * ALIGN)
    writer.begin(path, header_bytes, checksum)
    for piece in pieces:
        writer.write(piece)
    head = b"H" * header_bytes
    assert writer.finish(lambda: head) == header_bytes + sum(map(len, pieces))
    return writer, checksum


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, left = [], total
    while left:
        size = min(left, rng.choice([0, 1, 7, 4095, 4096, 4097, 8192, 20000, 70001]))
        pieces.append(rng.randbytes(size))
        left -= size
    return pieces


def _crc_blocks(data: bytes, block: int) -> list[int]:
    return [zlib.crc32(data[i : i + block]) for i in range(0, len(data), block)]


@pytest.mark.parametrize("total", [0, 1, 4096, 8192 * 2, 300_001])
@pytest.mark.parametrize("header_bytes", [ALIGN, 3 * ALIGN])
def test_the_file_holds_the_header_then_every_byte_in_order(tmp_path, monkeypatch, total, header_bytes):
    aligned_direct_writes(monkeypatch)  # every write one that O_DIRECT takes, whatever the filesystem
    pieces = _pieces(total, total)
    writer, checksum = _write(tmp_path / "f", pieces, header_bytes, buffer_bytes=2 * ALIGN, depth=2)
    data = b"".join(pieces)
    assert (tmp_path / "f").read_bytes() == b"H" * header_bytes + data
    assert checksum.blocks() == _crc_blocks(data, 3 * ALIGN)
    writer.begin(tmp_path / "g", ALIGN)  # the same buffers for the next file
    writer.write(b"second")
    writer.finish(lambda: b"h" * ALIGN)
    assert (tmp_path / "g").read_bytes() == b"h" * ALIGN + b"second"
    writer.close()


def test_a_filesystem_refusing_o_direct_at_open_gets_the_same_bytes(tmp_path, monkeypatch):
    real_open = os.open
    opened = []

    def refusing(path, flags, *args):
        opened.append(flags)
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", refusing)
    monkeypatch.setattr(direct_file, "direct_io_suits", lambda directory: bool(O_DIRECT))
    pieces = _pieces(1, 100_000)
    writer, checksum = _write(tmp_path / "f", pieces, buffer_bytes=4 * ALIGN, depth=3)
    assert not writer.direct and opened[-1] & O_DIRECT == 0
    assert (tmp_path / "f").read_bytes() == b"H" * ALIGN + b"".join(pieces)
    assert checksum.blocks() == _crc_blocks(b"".join(pieces), 3 * ALIGN)
    writer.close()


@pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux's; elsewhere every write uses the page cache")
def test_a_filesystem_refusing_o_direct_writes_gets_the_same_bytes_through_the_page_cache(
    tmp_path, monkeypatch
):
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    refused = []

    def refused_when_direct(write):
        def refusing(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return write(fd, data, offset)

        return refusing

    # one view goes out with pwrite; jobs joined in one write (direct_file.JoinedWrites) with pwritev
    monkeypatch.setattr(direct_file.os, "pwrite", refused_when_direct(real_pwrite))
    monkeypatch.setattr(direct_file.os, "pwritev", refused_when_direct(real_pwritev))
    monkeypatch.setattr(
        direct_file, "_open", lambda path, direct: (os.open(path, os.O_WRONLY | os.O_CREAT | O_DIRECT), True)
    )
    pieces = _pieces(2, 50_000)
    writer, _ = _write(tmp_path / "f", pieces, buffer_bytes=2 * ALIGN, depth=2)
    assert refused == [ALIGN] and not writer.direct  # refused once, then the page cache
    assert (tmp_path / "f").read_bytes() == b"H" * ALIGN + b"".join(pieces)
    writer.close()


@pytest.mark.parametrize("depth", [2, 8])
def test_a_failed_write_on_the_io_thread_reaches_the_caller_and_closes_the_file(tmp_path, monkeypatch, depth):
    """Writes queued behind the failing one (up to ``depth`` - 1 of them) are dropped, not written."""
    # the third write fails slowly, so that the caller queues the other buffers behind it meanwhile
    calls = fail_pwrite_at(monkeypatch, 3, errno.ENOSPC, delay=0.05)
    writer = AlignedWriter(buffer_bytes=ALIGN, depth=depth)
    writer.begin(tmp_path / "f", ALIGN)
    with pytest.raises(OSError) as raised:
        for _ in range(20):
            writer.write(b"x" * ALIGN)
        writer.finish(lambda: b"H" * ALIGN)
    assert raised.value.errno == errno.ENOSPC
    writer.abort()
    writer.close()
    assert len(calls) == 3  # nothing was written after the failure


def test_a_header_of_another_length_than_reserved_is_refused(tmp_path):
    writer = AlignedWriter(buffer_bytes=ALIGN, depth=2)
    writer.begin(tmp_path / "f", 2 * ALIGN)
    writer.write(b"data")
    with pytest.raises(RuntimeError, match="header came out 4096 bytes long, 8192 were left"):
        writer.finish(lambda: b"H" * ALIGN)
    with pytest.raises(ValueError, match="multiple of 4096"):
        writer.begin(tmp_path / "g", 100)
    writer.close()


def test_block_crc32_matches_zlib_over_any_split():
    rng = random.Random(5)
    data = rng.randbytes(50_000)
    for block in (1, 7, 4096, 50_000, 10**6):
        crc = BlockCrc32(block)
        position = 0
        while position < len(data):
            step = rng.choice([1, 3, 999, 5000])
            crc.update(data[position : position + step])
            position += step
        assert crc.blocks() == _crc_blocks(data, block)
        assert crc.recorded() == f"{block}:" + ",".join(f"{v:08x}" for v in _crc_blocks(data, block))


def test_o_direct_is_used_on_local_disk_filesystems_only(tmp_path, monkeypatch):
    device = os.stat(tmp_path).st_dev
    here = f"{os.major(device)}:{os.minor(device)}"
    table = tmp_path / "mountinfo"
    monkeypatch.setattr(direct_file, "_MOUNTINFO", table)

    def mounted(kind: str, dev: str = here, point: str = "/") -> None:
        table.write_text(
            "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
            f"27 1 {dev} / {point} rw,relatime - {kind} /dev/sda1 rw\n"
        )

    for kind, expected in [
        ("ext4", True),
        ("xfs", True),
        ("nfs4", False),
        ("fuse.gcsfuse", False),
        ("tmpfs", False),
    ]:
        mounted(kind)
        assert direct_file.filesystem_type(tmp_path) == kind
        assert direct_file.direct_io_suits(tmp_path) is (expected and bool(O_DIRECT)), kind
    mounted("btrfs", dev="0:99", point="/")  # no device match (a btrfs subvolume): the mount point decides
    assert direct_file.filesystem_type(tmp_path) == "btrfs"
    mounted("ext4", dev="0:99", point=str(tmp_path).replace(" ", "\\040") + "\\040x")  # "<tmp_path> x"
    assert direct_file.filesystem_type(tmp_path) is None and not direct_file.direct_io_suits(tmp_path)
    mounted("ext4", dev="0:99", point=str(tmp_path.parent))
    assert direct_file.filesystem_type(tmp_path) == "ext4"
    mounted("ext4")
    monkeypatch.setenv("FASTSAVE_O_DIRECT", "0")
    assert not direct_file.direct_io_suits(tmp_path)


def test_a_save_writes_its_shards_with_o_direct_where_it_suits(qlora_model, tmp_path, monkeypatch):
    """Whatever the filesystem under the test: told that it suits, the shards are opened asking for
    O_DIRECT (taken, or refused and written through the page cache), and they verify."""
    import fastsave
    from fastsave.io.verify import verify_checkpoint

    monkeypatch.setattr(direct_file, "direct_io_suits", lambda directory: True)
    real_open, asked = direct_file._open, []

    def spying(path, direct):
        asked.append(direct)
        return real_open(path, direct)

    monkeypatch.setattr(direct_file, "_open", spying)
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", max_shard_size="60KB")
    assert len(asked) > 3 and all(asked)
    report = verify_checkpoint(tmp_path / "out", checksums=True)
    assert report.ok and report.digests_checked == len(asked), report.summary()


def test_write_buffers_grow_with_the_output_and_are_paid_from_the_allowance():
    from fastsave.io.direct_file import BUFFER_BYTES, DEPTH, write_buffers

    mib = 1 << 20
    expected = {0: 1, 100 * mib: 1, 511 * mib: 1, 512 * mib: 2, 1023 * mib: 2, 1024 * mib: 4}
    expected |= {2007 * 10**6: 4, 2048 * mib: 8, 6282 * 10**6: 8, 16 << 30: 8}
    for output, each_mib in expected.items():
        each, depth, paid = write_buffers(512 * mib, minimal=False, output_bytes=output)
        assert (each, depth) == (each_mib * mib, DEPTH), output
        # what they hold beyond the smallest buffers comes out of what may wait for the writer
        assert paid == each * depth - BUFFER_BYTES * DEPTH
    # a small allowance keeps them at an eighth of it (what is left for the pieces: at least half)
    for allowance, each_mib in ((16 * mib, 2), (42 * mib, 4), (8 * mib, 1), (1 * mib, 1)):
        each, depth, paid = write_buffers(allowance, minimal=False, output_bytes=16 << 30)
        assert each == each_mib * mib, allowance
        assert each == BUFFER_BYTES or allowance - paid >= allowance // 2


def test_the_write_buffers_are_one_mapping_in_huge_pages_unless_smaller_than_one(monkeypatch):
    """4 x 1 MiB buffers (a save under 512 MiB) are one private mapping at a huge-page boundary, each
    buffer half a huge page, not 256 pages the device reads as 256 segments; buffers smaller than a
    huge page in all (a minimal budget's) are a shared mapping, which RLIMIT_DATA does not count."""
    from fastsave import mappings

    huge = 2 << 20
    monkeypatch.setattr(direct_file, "huge_page_bytes", lambda: huge)
    monkeypatch.setattr(mappings, "huge_page_bytes", lambda: huge)
    writer = AlignedWriter(buffer_bytes=1 << 20, depth=4)
    try:
        addresses = [direct_file.address_of(view) for view in writer._views]
        assert [b - a for a, b in itertools.pairwise(addresses)] == [1 << 20] * 3  # back to back
        found = [mapping_at(address) for address in addresses]
        assert all(found)
        start, _, line = found[0]
        assert line.split()[1].endswith("p") and addresses[0] % huge == 0  # private
        assert all(each[0] == start for each in found)
    finally:
        writer.close()
    small = AlignedWriter(buffer_bytes=16 * ALIGN, depth=2)
    try:
        shared = mapping_at(direct_file.address_of(small._views[0]))
        assert shared is not None and shared[2].split()[1].endswith("s")
    finally:
        small.close()


def test_a_minimal_memory_budget_gets_small_write_buffers():
    from fastsave.io.direct_file import write_buffers

    for allowance in (1 << 20, 5 << 20, 63 << 20):
        each, depth, paid = write_buffers(allowance, minimal=True)
        assert (
            depth == 2
            and paid == each * depth
            and each % ALIGN == 0
            and each >= ALIGN
            and each * depth <= max(2 * ALIGN, allowance // 8)
        )
    assert write_buffers(0, minimal=True) == (ALIGN, 2, 2 * ALIGN)


# -- pieces placed for their file offset: written from their own memory ----------------------------


def _placed(data: bytes, offset: int) -> memoryview:
    """``data`` in memory whose address is ``offset`` modulo ALIGN (how fastsave.io.placement
    allocates a merged block), built here with numpy."""
    raw = np.empty(len(data) + ALIGN, dtype=np.uint8)
    skip = (offset - raw.ctypes.data) % ALIGN
    view = memoryview(raw)[skip : skip + len(data)]
    view[:] = data
    return view


def test_pieces_placed_for_their_offset_are_written_from_their_memory_and_released_once_written(
    tmp_path, monkeypatch
):
    """Placed pieces (at every phase, long and short) between copied ones: the file holds every byte
    in order, its checksums are zlib's, every write is aligned, and each placed piece's middle went
    out from its memory (counted independently here) and was released on the I/O thread."""
    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", 2 * ALIGN)
    calls, _ = aligned_direct_writes(monkeypatch)
    rng = random.Random(11)
    header = 2 * ALIGN
    writer = AlignedWriter(buffer_bytes=4 * ALIGN, depth=2)
    checksum = BlockCrc32(block=5 * ALIGN)
    writer.begin(tmp_path / "f", header, checksum)
    data, released, expected_in_place = [], {}, 0
    position = header
    for k in range(60):
        size = rng.choice([5, ALIGN - 1, ALIGN, 2 * ALIGN + 7, 3 * ALIGN, 9 * ALIGN + 123, 20 * ALIGN])
        piece = rng.randbytes(size)
        placed = rng.random() < 0.7
        if placed:
            head = -position % ALIGN
            middle = max(0, size - head) // ALIGN * ALIGN
            expected_in_place += middle if middle >= 2 * ALIGN else 0
        released[k] = []
        writer.write(
            _placed(piece, position) if placed else piece,
            lambda k=k: released[k].append(threading.current_thread().name),
        )
        data.append(piece)
        position += size
    assert writer.finish(lambda: b"H" * header) == position
    content = b"".join(data)
    assert (tmp_path / "f").read_bytes() == b"H" * header + content
    assert checksum.blocks() == _crc_blocks(content, 5 * ALIGN)
    assert writer.in_place_bytes == expected_in_place > 20 * ALIGN
    assert all(len(names) == 1 for names in released.values())  # each piece released once
    assert any(names[0].startswith("fastsave-write") for names in released.values())
    assert sum(size for _, size in calls) >= len(content)  # the data and the header, no byte twice
    writer.close()


def test_a_failed_write_of_placed_pieces_reaches_the_caller_and_releases_every_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", ALIGN)
    aligned_direct_writes(monkeypatch)
    calls = fail_pwrite_at(monkeypatch, 2, errno.ENOSPC)
    writer = AlignedWriter(buffer_bytes=2 * ALIGN, depth=2)
    writer.begin(tmp_path / "f", ALIGN)
    released: list[int] = []
    with pytest.raises(OSError) as raised:
        position = ALIGN
        for k in range(30):
            writer.write(_placed(b"x" * 3 * ALIGN, position), lambda k=k: released.append(k))
            position += 3 * ALIGN
        writer.finish(lambda: b"H" * ALIGN)
    assert raised.value.errno == errno.ENOSPC
    writer.abort()
    writer.close()
    assert sorted(released) == list(range(len(released))) and len(set(released)) == len(released)
    assert len(released) == k + 1  # every piece handed in was released, once
    assert len(calls) == 2  # nothing was written after the failure


@pytest.mark.parametrize("slots", [64, 0])  # more than the seams (none runs out), none
def test_seams_between_placed_pieces_go_out_with_them(tmp_path, monkeypatch, slots):
    """Placed pieces that start and end inside blocks (a small tensor before them left the data
    off the blocks), with a small copied piece between some of them: the blocks between their
    middles join the batch from seam slots of their own (writes only of joined pieces, none of a
    lone seam block) while slots are free, and through the buffers (a write each) when none is;
    the file is the same."""
    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", ALIGN)
    monkeypatch.setattr(direct_file, "SEAM_SLOTS", slots)
    calls, _ = aligned_direct_writes(monkeypatch)
    header = ALIGN
    writer = AlignedWriter(buffer_bytes=4 * ALIGN, depth=2)
    checksum = BlockCrc32(block=5 * ALIGN)
    writer.begin(tmp_path / "f", header, checksum)
    rng = random.Random(5)
    bias = rng.randbytes(1792)  # a Qwen2 attention bias: every piece after it starts inside a block
    writer.write(bias)
    data, position, released = [bias], header + len(bias), []
    for k in range(40):
        piece = rng.randbytes(6 * ALIGN)  # a whole number of blocks: every one ends where it began
        writer.write(_placed(piece, position), lambda: released.append(1))
        data.append(piece)
        position += len(piece)
        if k % 5 == 4:  # a norm's weight copied between two merged weights
            small = rng.randbytes(2048)
            writer.write(small)
            data.append(small)
            position += len(small)
    assert writer.finish(lambda: b"H" * header) == position
    content = b"".join(data)
    assert (tmp_path / "f").read_bytes() == b"H" * header + content
    assert checksum.blocks() == _crc_blocks(content, 5 * ALIGN)
    assert len(released) == 40
    # the writes after the first (the bias and the first piece's head) and before the last two
    # (the tail, then the header)
    between = [size for _, size in calls[1:-2]]
    lone_seams = sum(size <= 2 * ALIGN for size in between)
    assert lone_seams == (0 if slots else 39)  # else one between each two pieces
    writer.close()


def test_placed_empty_puts_a_block_at_the_phase_of_its_file_offset():
    import torch

    from fastsave.io.placement import placed_empty, placing

    assert placed_empty((3, 5), torch.bfloat16).shape == (3, 5)  # outside a save: plain
    for offset in (0, 2, 4094, ALIGN + 6, 10**6):
        with placing(offset) as placement:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                if offset % dtype.itemsize:
                    continue
                block = placed_empty((7, 100), dtype)
                assert block.is_contiguous() and block.shape == (7, 100) and block.dtype == dtype
                assert block.data_ptr() % ALIGN == placement.offset % ALIGN
                block.fill_(1)  # the memory is its own
            placement.advance(ALIGN + 2)
            assert placed_empty((4,), torch.bfloat16).data_ptr() % ALIGN == (offset + ALIGN + 2) % ALIGN
    with placing(3):  # an offset no 2-byte value can sit at: plain
        assert placed_empty((4,), torch.bfloat16).shape == (4,)


# -- jobs joined into one write while the disk is busy (direct_file.JoinedWrites) -------------------


class _HeldWrites:
    """A write function for JoinedWrites whose first call waits until ``go`` is set (the disk busy
    with it, so that the jobs submitted meanwhile queue up); records each call's (views, offset)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[list[bytes], int]] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self.fail_at = fail_at

    def __call__(self, views: list[memoryview], offset: int) -> None:
        self.calls.append(([bytes(view) for view in views], offset))
        if len(self.calls) == 1:
            self.started.set()
            assert self.go.wait(10)
        if self.fail_at == len(self.calls):
            raise OSError(errno.ENOSPC, "No space left on device")


def _job(size: int, fill: int) -> list[memoryview]:
    return [memoryview(bytes([fill]) * size)]


def _writes_of(joined_bytes: int, waiting: list[tuple[int, int]]) -> _HeldWrites:
    """The writes JoinedWrites makes of a one-block job at offset 0 and then, while that one is being
    written, the ``waiting`` jobs (blocks, first block's offset in blocks; each filled with its
    number): the calls of the write function, in order."""
    write = _HeldWrites()
    joined = direct_file.JoinedWrites(write, joined_bytes=joined_bytes)
    futures = [joined.submit(_job(ALIGN, 1), 0)]
    assert write.started.wait(10)  # the thread is inside the first write: the others wait
    for fill, (blocks, at) in enumerate(waiting, start=2):
        futures.append(joined.submit(_job(blocks * ALIGN, fill), at * ALIGN))
    write.go.set()
    for future in futures:
        assert future.result(10) is None
    joined.shutdown()
    return write


def test_jobs_waiting_back_to_back_go_out_in_one_write_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(direct_file, "SMALL_WRITE_BYTES", 0)  # no write here counts as small
    write = _writes_of(
        3 * ALIGN,
        [
            (1, 1),  # back to back with the first, but that one is written
            (2, 2),  # joined with the one before it: 3 blocks
            (1, 4),  # back to back, past the limit: a write of its own
            (1, 9),  # not back to back: a write of its own
        ],
    )
    assert [(len(views), offset) for views, offset in write.calls] == [
        (1, 0),
        (2, ALIGN),
        (1, 4 * ALIGN),
        (1, 9 * ALIGN),
    ]
    assert write.calls[1][0] == [bytes([2]) * ALIGN, bytes([3]) * 2 * ALIGN]


def test_a_small_write_takes_the_next_job_past_the_limit_up_to_twice_it(monkeypatch):
    """A write still under SMALL_WRITE_BYTES joins the next job even past the limit (no small
    remainder written alone), up to twice the limit; a larger one stops at the limit."""
    monkeypatch.setattr(direct_file, "SMALL_WRITE_BYTES", 2 * ALIGN)
    write = _writes_of(
        4 * ALIGN,
        [
            (1, 1),  # 1 block: small, so the next may take it past 4
            (6, 2),  # 7 blocks together: within twice the limit
            (3, 8),  # 3 blocks: not small, stops at the limit ...
            (2, 11),  # ... which these 2 would pass: the next write
            (1, 13),  # within the limit: joined with the 2 before it
            (8, 14),  # past the limit of a 3-block write: its own
            (1, 22),  # small ...
            (8, 23),  # ... but 9 blocks are past twice the limit
        ],
    )
    assert [(len(views), offset) for views, offset in write.calls] == [
        (1, 0),
        (2, ALIGN),
        (1, 8 * ALIGN),
        (2, 11 * ALIGN),
        (1, 14 * ALIGN),
        (1, 22 * ALIGN),
        (1, 23 * ALIGN),
    ]


def test_with_no_room_to_join_every_job_is_a_write_of_its_own():
    write = _HeldWrites()
    joined = direct_file.JoinedWrites(write, joined_bytes=0)
    futures = [joined.submit(_job(ALIGN, 1), 0)]
    assert write.started.wait(10)
    futures += [joined.submit(_job(ALIGN, k), k * ALIGN) for k in range(1, 4)]
    write.go.set()
    joined.shutdown()
    assert all(future.done() and future.exception() is None for future in futures)
    assert [offset for _, offset in write.calls] == [0, ALIGN, 2 * ALIGN, 3 * ALIGN]


def test_a_failed_joined_write_fails_every_job_in_it_and_a_cancelled_job_is_not_written():
    write = _HeldWrites(fail_at=2)
    joined = direct_file.JoinedWrites(write, joined_bytes=16 * ALIGN)
    joined.submit(_job(ALIGN, 1), 0)
    assert write.started.wait(10)
    failing = [joined.submit(_job(ALIGN, 2), ALIGN), joined.submit(_job(ALIGN, 3), 2 * ALIGN)]
    cancelled = joined.submit(_job(ALIGN, 4), 3 * ALIGN)
    after = joined.submit(_job(ALIGN, 5), 4 * ALIGN)
    assert cancelled.cancel()
    write.go.set()
    for future in failing:
        assert isinstance(future.exception(10), OSError)
    assert after.result(10) is None
    joined.shutdown()
    # the cancelled job's bytes were never written, and the one after it was not joined across the gap
    assert [(len(views), offset) for views, offset in write.calls] == [(1, 0), (2, ALIGN), (1, 4 * ALIGN)]
    with pytest.raises(RuntimeError):
        joined.submit(_job(ALIGN, 6), 5 * ALIGN)


@pytest.mark.parametrize("joined_bytes", [0, 2 * ALIGN, 64 * ALIGN])
def test_joined_writes_leave_the_same_file(tmp_path, monkeypatch, joined_bytes):
    """Buffers and pieces written from their own memory, every job queued behind a first write that
    waits until all are handed over (so that they are joined, deterministically): the file is the
    bytes handed in, every held piece is released, and no write joins jobs past the limit."""
    gate = threading.Event()
    real_write_at, real_submit = direct_file._write_at, direct_file.JoinedWrites.submit
    writes: list[int] = []
    jobs: list[int] = []

    def gated(fd, views, offset):
        assert gate.wait(10)
        writes.append(sum(len(view) for view in views))
        return real_write_at(fd, views, offset)

    def counted(self, views, offset):
        jobs.append(sum(len(view) for view in views))
        return real_submit(self, views, offset)

    monkeypatch.setattr(direct_file, "_write_at", gated)
    monkeypatch.setattr(direct_file.JoinedWrites, "submit", counted)
    monkeypatch.setattr(direct_file, "direct_io_suits", lambda directory: True)
    monkeypatch.setattr(
        direct_file, "_open", lambda path, direct: (os.open(path, os.O_WRONLY | os.O_CREAT), True)
    )
    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", ALIGN)
    # enough buffers that the writer never waits for one: all jobs are handed over before any write
    writer = AlignedWriter(buffer_bytes=2 * ALIGN, depth=128, joined_bytes=joined_bytes)
    writer.begin(tmp_path / "f", ALIGN)
    rng = np.random.default_rng(0)
    pieces, released, position = [], [], ALIGN
    for k in range(24):
        data = rng.bytes(3 * ALIGN + k * 512)
        # placed for its file offset (as fastsave.io.placement places merged blocks): its aligned
        # middle goes out from its own memory, its head and tail through the buffers
        room = np.empty(len(data) + ALIGN, dtype=np.uint8)
        skip = (position - room.ctypes.data) % ALIGN
        piece = room[skip : skip + len(data)]
        piece[:] = np.frombuffer(data, dtype=np.uint8)
        pieces.append(data)
        writer.write(memoryview(piece), release=lambda k=k: released.append(k))
        position += len(data)
    gate.set()
    writer.finish(lambda: b"H" * ALIGN)
    writer.close()
    assert (tmp_path / "f").read_bytes() == b"H" * ALIGN + b"".join(pieces)
    assert sorted(released) == list(range(24))
    assert writer.in_place_bytes > 0
    data_writes = writes[:-1]  # the last is the header's, written by finish itself
    assert sum(data_writes) == sum(jobs)
    if joined_bytes == 0:
        assert data_writes == jobs
    else:  # a write is one job as it came, or jobs joined up to the limit (a small write's: twice it)
        assert all(size <= 2 * joined_bytes or size in jobs for size in data_writes)
        if joined_bytes == 64 * ALIGN:  # room for several: they were joined
            assert len(data_writes) < len(jobs) and max(data_writes) > max(jobs)


def test_joined_writes_are_a_quarter_of_the_allowance_and_none_when_memory_is_minimal():
    assert direct_file.joined_write_bytes(16 << 20, False) == 4 << 20
    assert direct_file.joined_write_bytes(1 << 30, False) == direct_file.JOINED_BYTES
    assert direct_file.joined_write_bytes(10_000_001, False) % ALIGN == 0
    assert direct_file.joined_write_bytes(1 << 30, True) == 0
