"""Shard files written through a few page-aligned buffers, with O_DIRECT where the filesystem takes it.

Why: on two cores the page cache was the save's largest cost. Copying 0.5 GB into it and the
kernel's writeback of those pages took 0.3-3 s (varying with the moment) where O_DIRECT puts the
same bytes on the same disk in 0.15 s (benchmarks/save_cpu.py's floor): the device reads them from
the buffers, the CPU only copies them there (26 GB/s), and fsync has little left to do. It also
keeps a save from filling the page cache with gigabytes of dirty pages on a machine short of RAM.

How: :meth:`AlignedWriter.write` copies the data stream into one of ``depth`` aligned buffers; a
full buffer is fed to the shard's checksum (fastsave.io.checksums: the bytes are still in cache)
and goes to one I/O thread, which writes it at its offset while the caller fills the next buffer
(with the jobs waiting back to back behind it, in one write: :class:`JoinedWrites`).
The I/O thread does nothing but write, so the disk never waits for the checksum (on 2 cores at
1B: 1.34x the floor against 1.47x with the checksum on the I/O thread in one run, 1.72x against
1.77x in another; docs/performance.md).

Pieces placed for it are written without that copy (:meth:`AlignedWriter.write` with ``release``):
a piece whose memory address is its file offset modulo :data:`ALIGN` (fastsave.io.placement
allocates the merged row blocks so) has its aligned middle written straight from its memory, a few
such middles in one ``pwritev``; only its unaligned head and tail pass through the buffers. The
writer then holds the piece until the I/O thread has written it, and ``release`` says when it let
go. On this project's 2-core machine the copy into the buffers was the largest cost of the save
left beside the writes themselves (benchmarks/save_phases.py; docs/performance.md).
The header comes last (:meth:`AlignedWriter.finish`): the data starts at a 4096-aligned offset (the
caller pads the header with spaces, which safetensors' JSON header allows), so the header is whole
blocks, written once the checksum in it is known. Until then the file's first bytes are zeros, which
no reader takes for a safetensors header. The last buffer is written padded to 4096 bytes and the
file truncated to its length.

O_DIRECT is used on local disk filesystems only (:data:`DIRECT_FILESYSTEMS`, read from
/proc/self/mountinfo): on a network or FUSE mount each synchronous write would wait for a round
trip that the page cache's writeback overlaps. A filesystem that refuses O_DIRECT anyway, when the
file is opened or at its first write, gets the same writes through the page cache, and
``FASTSAVE_O_DIRECT=0`` in the environment turns it off.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from fastsave.mappings import huge_page_bytes, mapped_buffer

logger = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT's alignment of memory, offsets and lengths (a multiple of any block size up to 4 KiB)
BUFFER_BYTES = 1 << 20  # the smallest of the write buffers a save holds when its memory is not minimal
MAX_BUFFER_BYTES = 8 << 20  # the largest: at 250M, 2 x 16 MiB was slower (its first write started later)
BUFFERS_PER_OUTPUT = 256  # a buffer is at most this fraction of the output (the 4 of them 1/64)
DEPTH = 4
# jobs waiting back to back are joined into one write up to this many bytes (at 3B, blocks of 8 MiB go out in
# threes instead of pairs: 8 of 10 saves faster on 2 cores, medians 3.03 against 3.13 s; smaller saves' limit
# is their quarter of the allowance, under 16 MiB)
JOINED_BYTES = 32 << 20
JOINED_SHARE = 4  # ... and at most this fraction of the memory allowance (what may wait for the writer)
SMALL_WRITE_BYTES = 4 << 20  # a write smaller than this may take the next job up to twice the limit
IN_PLACE_MIN = 64 << 10  # a placed piece's aligned middle shorter than this is copied (a syscall costs more)
# the blocks between placed pieces (a piece's tail, small tensors copied, the next piece's head) go
# into the pieces' joint write from small slots of their own, up to this many bytes, in this many slots
SEAM_BYTES = 16 << 10
SEAM_SLOTS = 32
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere the page cache is used
# local block-device filesystems, where O_DIRECT is the fastest way to the disk
DIRECT_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "jfs", "overlay"}
)
_MOUNTINFO = Path("/proc/self/mountinfo")


class StreamChecksum(Protocol):
    """What the writer feeds every data byte to, in file order (fastsave.io.checksums.BlockCrc32)."""

    def update(self, data: memoryview) -> None: ...


def write_buffers(allowance: int, minimal: bool, output_bytes: int = 0) -> tuple[int, int, int]:
    """The write buffers a save of ``output_bytes`` holds: their size, their number, and how many of
    their bytes the save's byte budget pays for (what may wait for the writer is that much smaller).

    :data:`DEPTH` buffers of the largest power of two from :data:`BUFFER_BYTES` (1 MiB) to
    :data:`MAX_BUFFER_BYTES` (8 MiB) that is at most a 256th of the output (1 MiB below 512 MiB of
    output, 2 MiB below 1 GiB, 4 MiB below 2 GiB, 8 MiB from there) and an eighth of the
    ``allowance``; what they hold beyond 4 x 1 MiB is paid from the allowance, so that a larger
    save's larger buffers do not add to its memory. Why larger writes for larger saves: inside a
    save the O_DIRECT writes of its one I/O thread are what it waits for, and on this project's
    2-core machine 1 MiB writes took a 2 GB output at 1.35-1.64 GB/s, 4 MiB writes at 1.74-1.88
    and 8 MiB writes at 1.9-2.4 (the disk's floor: 2.5-3.1 GB/s), while a small save did not earn
    back the later start of its first, larger write (benchmarks/save_phases.py).

    When the memory budget is minimal: an eighth of its ``allowance`` in two buffers (4 KiB each at
    least), all of it paid from the allowance.
    """
    if minimal:
        each = max(ALIGN, min(BUFFER_BYTES, allowance // 16) // ALIGN * ALIGN)
        return each, 2, each * 2
    each = BUFFER_BYTES
    while each * 2 <= min(MAX_BUFFER_BYTES, output_bytes // BUFFERS_PER_OUTPUT, allowance // 8):
        each *= 2
    return each, DEPTH, (each - BUFFER_BYTES) * DEPTH


def joined_write_bytes(allowance: int, minimal: bool) -> int:
    """The largest write that jobs waiting back to back are joined into (:class:`JoinedWrites`; a
    write still under :data:`SMALL_WRITE_BYTES` may take the next job up to twice this): a
    :data:`JOINED_SHARE` of the save's memory ``allowance`` (fastsave.memory.in_flight_bytes: a 48th
    of the output, at least 24 MiB; a 32nd up to 32 MiB where that is more), at most
    :data:`JOINED_BYTES`; 0 (nothing joined) when the memory budget is minimal.

    Measured on 2 cores, interleaved in one process: at 1B (42 MB allowed to wait) writes joined up
    to 10 MiB took the save 0.99 s against 1.10 s unjoined and 1.05 s up to 16 MiB; at 250M (16 MiB
    allowed to wait then) up to 4 MiB 0.363 against 0.379 s, while 8 MiB gained nothing and 16 MiB
    lost (0.446 against 0.422 s): the producer then waited for bytes a long write held. At 3B (a
    quarter of the allowance is 31 MiB) 32 MiB against 16: 8 of 10 paired saves faster (docs/
    performance.md).
    """
    return 0 if minimal else min(JOINED_BYTES, allowance // JOINED_SHARE) // ALIGN * ALIGN


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


def _write_at(fd: int, views: list[memoryview], offset: int) -> int:
    if len(views) > 1 and hasattr(os, "pwritev"):
        return os.pwritev(fd, views, offset)
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, views[0], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.write(fd, views[0])  # pragma: no cover


def address_of(view: memoryview) -> int:
    """The memory address of the first byte of ``view`` (read-only views too)."""
    import numpy as np  # here: `fastsave verify` and the CLI's start import no numpy for this module

    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def filesystem_type(directory: Path) -> str | None:
    """The type of the filesystem ``directory`` is on (Linux's mount table), or None if unknown."""
    try:
        device = os.stat(directory).st_dev
        lines = _MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    resolved = str(Path(directory).resolve())
    by_prefix: tuple[int, str] | None = None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts, kind = fields.split(), rest.split(" ", 1)[0]
        if len(parts) < 5 or not kind:
            continue
        if parts[2] == wanted:
            return kind
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # a space is \040
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and (by_prefix is None or len(mount) >= by_prefix[0]):
            by_prefix = (len(mount), kind)
    return by_prefix[1] if by_prefix else None


def direct_io_suits(directory: Path) -> bool:
    """Whether files in ``directory`` are written with O_DIRECT (a local disk filesystem, not
    switched off by ``FASTSAVE_O_DIRECT=0``)."""
    if not _O_DIRECT or os.environ.get("FASTSAVE_O_DIRECT", "1").strip() in ("0", "false", "no", "off"):
        return False
    return filesystem_type(directory) in DIRECT_FILESYSTEMS


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    """A new file for writing, and whether O_DIRECT took (when ``direct`` asks for it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if direct:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            logger.debug("fastsave: %s refuses O_DIRECT; writing through the page cache", path.parent)
    return os.open(path, flags, 0o666), False


class JoinedWrites:
    """One thread that runs write jobs (views written at an offset) in the order they came, joining
    the jobs waiting back to back in the file into one write.

    Why: a save's writer hands over a job per buffer or per batch of merged blocks, 1-4 MiB. On
    this project's 2-core machine O_DIRECT took 2 GB in 4 MiB writes 6% slower than in 16 MiB
    writes while the producer merged beside it. Whenever the disk is what the save waits for, jobs
    queue up behind the write in progress, and the next write takes those back to back at once,
    up to ``joined_bytes`` (0: never joined); when the disk keeps up, each job
    goes out as it comes. A joined write gives its jobs' bytes back to the budget only when all of
    it is written, so it is kept to a fraction of what may wait for the writer
    (:func:`joined_write_bytes`).

    A write smaller than :data:`SMALL_WRITE_BYTES` may take the next job even past that limit, up
    to twice it: small writes cost this disk the most (1 MiB O_DIRECT writes went at 1.4-1.8 GB/s
    inside a 250M save, 6-7 MiB ones at 2.5-2.9), and at 250M a merged block cut at the limit (6
    MiB blocks of a 7 MiB weight, joined up to 6 MiB) left its 1 MiB remainder to a write of its
    own. No memory is added: the jobs are in memory already. Measured on 2 cores, alternating in
    one process with the floor timed after each save: 250M 9 of 12 saves faster (medians 0.275
    against 0.289 s); 1B 5 of 10 (0.925 against 0.941 s: no difference). Letting any write's last
    job go past the limit, up to twice, was faster still at 250M (12 of 12) but slower at 1B (4 of
    12, medians 0.973 against 0.890 s: 8 MiB blocks joined in pairs held too much of the allowance
    for the producer to keep ahead).
    """

    def __init__(self, write: Callable[[list[memoryview], int], None], joined_bytes: int) -> None:
        self._write = write
        self._joined_bytes = joined_bytes
        self._jobs: deque[tuple[list[memoryview], int, Future]] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._views_max = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)
        self._thread = threading.Thread(target=self._run, name="fastsave-write", daemon=True)
        self._thread.start()

    def submit(self, views: list[memoryview], offset: int) -> Future:
        """Write ``views`` one after the other at ``offset`` on the thread; the future ends with the
        write (cancelled, it is not written)."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the writer's thread was stopped")
            self._jobs.append((views, offset, future))
            self._condition.notify()
        return future

    def shutdown(self) -> None:
        """Run the jobs already submitted, then stop the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _next_jobs(self) -> list[tuple[list[memoryview], int, Future]] | None:
        """The next job and those back to back behind it, up to the limit (while the write is small,
        up to twice it); None: stopped, nothing left."""
        with self._condition:
            while True:
                while not self._jobs and not self._closed:
                    self._condition.wait()
                if not self._jobs:
                    return None
                first = self._jobs.popleft()
                if first[2].set_running_or_notify_cancel():
                    break
            group = [first]
            end = first[1] + sum(len(view) for view in first[0])
            size, count = end - first[1], len(first[0])
            while self._jobs:
                views, offset, future = self._jobs[0]
                length = sum(len(view) for view in views)
                room = self._joined_bytes if size >= SMALL_WRITE_BYTES else 2 * self._joined_bytes
                if offset != end or size + length > room or count + len(views) > self._views_max:
                    break
                self._jobs.popleft()
                if not future.set_running_or_notify_cancel():
                    break  # cancelled: what follows it is not back to back with the group
                group.append((views, offset, future))
                end, size, count = end + length, size + length, count + len(views)
            return group

    def _run(self) -> None:
        while (group := self._next_jobs()) is not None:
            try:
                self._write([view for views, _, _ in group for view in views], group[0][1])
            except BaseException as error:  # every joined job reports the write's error
                for _, _, future in group:
                    future.set_exception(error)
            else:
                for _, _, future in group:
                    future.set_result(None)


class AlignedWriter:
    """Writes files front to back from aligned buffers on one I/O thread; one file at a time.

    ``begin(path, start, checksum)``, ``write(data)`` any number of times, ``finish(header)``; then
    the next file, and ``close()`` at the end (``abort()`` drops an unfinished file's writes).
    ``buffer_bytes * depth`` bytes of memory are held (and touched) from construction to close.
    """

    def __init__(self, buffer_bytes: int = BUFFER_BYTES, depth: int = DEPTH, joined_bytes: int = 0) -> None:
        if buffer_bytes % ALIGN or buffer_bytes <= 0 or depth < 2:
            raise ValueError(f"buffers of {buffer_bytes} bytes (a multiple of {ALIGN}), at least 2 of them")
        # one page-aligned mapping, cut into the buffers. Where it holds a huge page or more: private,
        # in huge pages where the kernel gives them, which the device reads in fewer, larger segments
        # (fastsave.mappings); the 4 x 1 MiB buffers of a save under 512 MiB too, each in one half of
        # a huge page instead of 256 pages: their writes went at 1.3-2 GB/s (perf trace), and 250M
        # saves on 2 cores alternating with the shared buffers won 8 of 8 pairs and 11 of 14
        # (fastest five 0.245-0.258 s against 0.257-0.270 s). Smaller (a minimal budget's): shared,
        # which RLIMIT_DATA does not count
        total = buffer_bytes * depth
        huge = huge_page_bytes()
        self._map = mapped_buffer(total) if huge and total >= huge else mmap.mmap(-1, total)
        self._whole = memoryview(self._map).cast("B")[:total]
        self._views = [self._whole[k * buffer_bytes : (k + 1) * buffer_bytes] for k in range(depth)]
        for view in self._views:  # count them as held now, not as the save's growth later
            for page in range(0, buffer_bytes, mmap.PAGESIZE):
                view[page] = 0
        self._in_flight: list[Future | None] = [None] * depth
        self._io = JoinedWrites(self._write_job, joined_bytes)
        self._fd = -1
        self._direct = False
        self._checksum: StreamChecksum | None = None
        self._slot = 0  # the buffer being filled
        self._fill = 0  # bytes in it
        self._offset = 0  # the file offset of its first byte
        self._start = 0  # where the current file's data begins: the header's length
        self._direct_suits: tuple[Path, bool] | None = None
        self._failed = False  # a write of the current file failed: the ones queued behind it are dropped
        # placed pieces' aligned middles waiting to go out together (the file's bytes just before
        # the buffer being filled), what to call once each is written, and where they start
        self._batch: list[memoryview] = []
        self._batch_releases: list[Callable[[], None]] = []
        self._batch_offset = 0
        self._batches: deque[Future] = deque()  # submitted batches, oldest first
        # slots for the seams between placed pieces, touched when first used
        self._seam_map = mmap.mmap(-1, max(ALIGN, SEAM_BYTES * SEAM_SLOTS))
        self._seam_whole = memoryview(self._seam_map)
        self._seam_slots = [
            self._seam_whole[k * SEAM_BYTES : (k + 1) * SEAM_BYTES] for k in range(SEAM_SLOTS)
        ]
        self._seams_free = list(self._seam_slots)
        self.in_place_bytes = 0  # bytes written straight from the caller's memory (for benchmarks, tests)

    @property
    def direct(self) -> bool:
        """Whether the current file is written with O_DIRECT (not through the page cache)."""
        return self._direct

    def begin(self, path: Path, start: int, checksum: StreamChecksum | None = None) -> None:
        """Open ``path`` (created or truncated); the data written next lands at ``start``, a
        multiple of :data:`ALIGN` (the header's length, written by :meth:`finish`)."""
        if start % ALIGN:
            raise ValueError(f"the data must start at a multiple of {ALIGN} bytes, not {start}")
        self.abort()
        if self._direct_suits is None or self._direct_suits[0] != path.parent:  # asked once per directory
            self._direct_suits = (path.parent, direct_io_suits(path.parent))
        self._fd, self._direct = _open(path, self._direct_suits[1])
        self._checksum = checksum
        self._start = self._offset = start
        self._fill = 0
        self._failed = False

    def write(self, data: memoryview | bytes, release: Callable[[], None] | None = None) -> None:
        """Append ``data`` to the file.

        Without ``release`` the data is copied: the caller may reuse it on return. With it, the
        writer may write the data's aligned middle from the caller's memory, later, on its I/O
        thread: the caller must leave the data unchanged until ``release()`` is called (once, on
        the I/O thread or on this one; before this returns when all of it was copied; also when
        this raises).

        Raises:
            OSError: an earlier write of this file failed (ENOSPC for a full disk).
        """
        view = memoryview(data).cast("B")
        rest = None
        try:
            self._raise_failed_batches()
            if release is not None:
                rest = self._place(view, release)  # not None: the batch holds the release now
            self._copy(view if rest is None else rest)
        finally:
            if release is not None and rest is None:
                release()
        # a batch goes out once it holds a buffer's worth (batches of 16 MiB were no faster at 250M, 1B)
        if sum(len(part) for part in self._batch) >= len(self._views[0]):
            self.flush()

    def flush(self) -> None:
        """Hand the placed pieces waiting to be written together to the I/O thread now (the caller
        is about to wait for more data: what it holds must be on its way to be given back)."""
        if self._batch:
            views, releases, offset = self._batch, self._batch_releases, self._batch_offset
            self._batch, self._batch_releases = [], []
            future = self._io.submit(views, offset)
            future.add_done_callback(lambda _done: [release() for release in releases])
            self._batches.append(future)

    def finish(self, header: Callable[[], bytes]) -> int:
        """Write the rest of the data, then what ``header()`` returns at offset 0 (called once the
        data is out and its checksum complete; as long as the ``start`` given to :meth:`begin`),
        truncate to the data's end, fsync and close; return the file's size.

        Raises:
            OSError: a write failed (ENOSPC for a full disk); the file is closed, unfinished.
        """
        try:
            if self._fill:
                self._submit()
            self.flush()
            self._drain()
            end = self._offset
            head = header()
            if len(head) != self._start:
                raise RuntimeError(
                    f"the header came out {len(head)} bytes long, {self._start} were left for it"
                )
            os.ftruncate(self._fd, end)  # the last buffer went out padded to a whole block
            for position in range(0, len(head), len(self._views[0])):
                piece = head[position : position + len(self._views[0])]
                self._views[0][: len(piece)] = piece
                self._pwrite([self._views[0][: len(piece)]], position)
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        return end

    def abort(self) -> None:
        """Drop the current file's writes still to do and close it (what reached it stays); the
        pieces held are released."""
        self._failed = True  # batches not begun are dropped
        releases, self._batch, self._batch_releases = self._batch_releases, [], []
        for release in releases:
            release()
        for slot, future in enumerate(self._in_flight):
            if future is not None:
                future.cancel()
                with contextlib.suppress(Exception):  # a failed write was reported already
                    future.result()
                self._in_flight[slot] = None
        while self._batches:
            future = self._batches.popleft()
            future.cancel()
            with contextlib.suppress(Exception):
                future.result()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Abort any unfinished file, stop the I/O thread and free the buffers."""
        self.abort()
        self._io.shutdown()
        self._seams_free.clear()
        resources = (
            *self._views,
            self._whole,
            self._map,
            *self._seam_slots,
            self._seam_whole,
            self._seam_map,
        )
        for resource in resources:
            # a slice may outlive the writer in a traceback: the buffer is then freed with it
            with contextlib.suppress(BufferError):
                if isinstance(resource, memoryview):
                    resource.release()
                elif isinstance(resource, mmap.mmap):
                    resource.close()  # a huge-page window is unmapped once the last view is gone
        self._views, self._whole, self._map = [], None, None
        self._seam_slots, self._seam_whole, self._seam_map = [], None, None

    # -- the caller's side ---------------------------------------------------------------------

    def _copy(self, view: memoryview) -> None:
        """``view`` into the buffers, each full one handed to the I/O thread."""
        while len(view):
            buffer = self._views[self._slot]
            take = min(len(view), len(buffer) - self._fill)
            buffer[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == len(buffer):
                self._submit()

    def _place(self, view: memoryview, release: Callable[[], None]) -> memoryview | None:
        """Batch ``view``'s aligned middle to go out from its memory, when it is placed for its file
        offset and long enough (its head copied first); return its tail, still to copy (None:
        nothing was done, ``view`` is to be copied whole)."""
        position = self._offset + self._fill  # the file offset of view's first byte
        head = -position % ALIGN
        middle = (len(view) - head) // ALIGN * ALIGN
        if not self._direct or self._failed or middle < IN_PLACE_MIN:
            return None
        if (address_of(view) - position) % ALIGN:
            return None  # not placed for this offset: copied
        self._copy(view[:head])
        # the buffer now ends at an aligned offset; it goes out before the middle, in the batch when
        # it is a seam (without taking a buffer of the few the writer has)
        if self._fill and not self._seam():
            self._submit()
        self._to_batch(view[head : head + middle], release)
        self.in_place_bytes += middle
        return view[head + middle :]

    def _to_batch(self, part: memoryview, release: Callable[[], None]) -> None:
        """Append ``part`` (whole blocks, the file's next bytes) to the batch, ``release`` to be
        called once it is written."""
        if not self._batch:
            self._batch_offset = self._offset
        self._batch.append(part)
        if self._checksum is not None:  # here, in file order, so that the I/O thread only writes
            self._checksum.update(part)
        self._batch_releases.append(release)
        self._offset += len(part)  # the buffer's bytes now follow the batch's

    def _seam(self) -> bool:
        """Move the buffer's bytes (whole blocks, at most :data:`SEAM_BYTES`) into the batch, from
        a seam slot of their own; False when they are more or no slot is free.

        Why: where tensors do not fill whole blocks (a Qwen2 model's attention biases, 1792 and 256
        bytes, put every weight after them inside a block), each merged block placed for its offset
        begins and ends inside a block. Through the buffers, each seam between two blocks took one
        of the few buffers and a write of its own (docs/performance.md)."""
        if self._fill > SEAM_BYTES or not self._seams_free:
            return False
        slot = self._seams_free.pop()
        seam = slot[: self._fill]
        seam[:] = self._views[self._slot][: self._fill]
        self._fill = 0
        self._to_batch(seam, lambda: self._seams_free.append(slot))
        return True

    def _submit(self) -> None:
        self.flush()  # the batch's bytes come before the buffer's
        slot, size, offset = self._slot, self._fill, self._offset
        if self._checksum is not None:  # the bytes just copied, still in cache
            self._checksum.update(self._views[slot][:size])
        self._in_flight[slot] = self._io.submit([self._views[slot][: aligned(size)]], offset)
        self._offset += size
        self._fill = 0
        self._slot = (slot + 1) % len(self._views)
        self._wait(self._slot)  # the next buffer's previous contents must be on disk first

    def _wait(self, slot: int) -> None:
        future, self._in_flight[slot] = self._in_flight[slot], None
        if future is not None:
            future.result()

    def _raise_failed_batches(self) -> None:
        while self._batches and self._batches[0].done():
            self._batches.popleft().result()

    def _drain(self) -> None:
        for offset in range(len(self._views)):
            self._wait((self._slot + offset) % len(self._views))
        while self._batches:
            self._batches.popleft().result()

    # -- the I/O thread's side ---------------------------------------------------------------

    def _write_job(self, views: list[memoryview], offset: int) -> None:
        """One job of the I/O thread: ``views`` written one after the other at ``offset``."""
        if self._failed:  # the file is unfinished already; its error reaches the caller from that write
            return
        try:
            self._pwrite(views, offset)
        except BaseException:
            self._failed = True
            raise

    def _pwrite(self, views: list[memoryview], offset: int) -> None:
        """All of ``views``, one after the other, at ``offset`` (in one system call where it can)."""
        views = [view for view in views if len(view)]
        while views:
            try:
                written = _write_at(self._fd, views, offset)
            except OSError as error:
                if error.errno != errno.EINVAL or not self._direct:
                    raise
                # the filesystem opened the file with O_DIRECT but refuses its writes: the page cache
                import fcntl  # only where O_DIRECT exists (Linux)

                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self._direct = False
                logger.debug("fastsave: O_DIRECT writes refused (%s); writing through the page cache", error)
                continue
            offset += written
            while written:
                if written >= len(views[0]):
                    written -= len(views.pop(0))
                else:
                    views[0], written = views[0][written:], 0
