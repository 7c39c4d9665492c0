"""The memory bound of a save: how many bytes its work may hold, measured as anonymous memory.

``maximum_memory_usage`` is a fraction of the memory the process may use: the machine's RAM, or
the container's limit (cgroup ``memory.max``) when that is smaller, as on Colab and Kaggle. What
counts against it is anonymous memory (RssAnon: heap and private mappings); the page cache of
memory-mapped checkpoint files is reclaimable, and spilled buffers live in files, so neither
counts. The save's allowance is that limit minus what the process holds when the save starts
(the model, the libraries). Work is admitted by bytes against the allowance (:class:`ByteBudget`):
produced chunks waiting for the writer, and the working set of the tensor being merged. A budget
already exceeded is not an error: the save keeps the smallest working set (one chunk in flight,
anything bigger spilled to disk) and says so.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import threading
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

MIB = 2**20
# Below this allowance the save runs with the smallest working set it has (and says so).
MINIMAL_ALLOWANCE = 64 * MIB
# What may wait for the writer: a 48th of the output, between these bounds. The producer must be able
# to run ahead while the writer is held up by the kernel's dirty-page throttling (which starts once
# about a fifth of the RAM is unwritten), or the save takes the sum of its merge and write times; a
# bound that does not scale with the output holds a large share of a small checkpoint for nothing.
# At least 24 MiB: with the I/O thread joining the writes that wait (fastsave.io.direct_file), a
# 250M save on 2 cores took 0.376 / 0.336 s against 0.396 / 0.383 s with 16 MiB (two runs of 10-12
# interleaved rounds) and held 40 MiB (8% of its output) of extra anonymous memory against 26 MiB;
# 32 MiB was a little faster again but held 56 MiB, past a tenth of that output.
MIN_IN_FLIGHT = 24 * MIB
MAX_IN_FLIGHT = 512 * MIB
IN_FLIGHT_SHARE = 48
# ... and a 32nd of the output up to 32 MiB, where that is more: a Qwen2.5-0.5B-shaped model (0.99 GB
# out, its MLP weights 8.3 MiB each) on 2 cores: medians 0.63 / 0.67 s against 0.75 / 0.75 s with
# 31 MiB against 24 (15 of 16 paired saves faster in two runs). With 24 MiB the I/O thread joined
# at most 6 MiB and each MLP weight went out as 6 + 2.3 MiB, about 200 writes a save with the disk
# idle 112-164 ms, against about 100 writes of whole weights and 22-32 ms idle. At 1B (42 MiB
# already) 64 or 85 MiB gained nothing (3 and 5 of 8 faster); at 250M 28 or 32 MiB neither (5 of
# 10), and 32 MiB would hold more than a tenth of its output.
SMALL_IN_FLIGHT_SHARE = 32
SMALL_IN_FLIGHT_MAX = 32 * MIB
# Never less than this: a few row blocks.
MIN_ALLOWANCE = MIB
# The reference product of a row-block exactness check (fastsave.merge.row_blocks), the size of
# the largest LoRA weight, was spilled to a file beyond four row blocks: in a first save on 2
# cores the checks took 0.103-0.118 s at 1B and 0.033-0.035 s at 250M. Now it is in memory,
# admitted against the byte budget where it fits the allowance (the producer waits for written
# pieces to make room), else kept beside it up to this share of the output (about 3% of a
# Llama-shaped model's: one MLP weight against all of them), in one buffer every such check of
# the save reuses; larger, it is spilled as before. The checks then took 0.057-0.060 s at 1B (kept
# beside: 58 MB against a 30 MiB limit) and 0.018-0.022 s at 250M (admitted).
CHECK_SHARE = 32


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def anonymous_memory() -> int:
    """This process's anonymous resident memory (RssAnon) in bytes; its RSS where the kernel does not say."""
    kib = _status_kib("RssAnon")
    return kib * 1024 if kib is not None else psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2].lstrip("/")
        if controllers == "":  # cgroup v2
            candidates = [Path("/sys/fs/cgroup") / path / "memory.max", Path("/sys/fs/cgroup/memory.max")]
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            candidates = [base / path / "memory.limit_in_bytes", base / "memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                value = candidate.read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 2**60:
                return int(value)
    return None


def memory_limit() -> int:
    """The memory this process may use: RAM, or the container's limit when that is smaller."""
    total = psutil.virtual_memory().total
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


# Threads a save starts (the writer, the I/O thread of fastsave.io.direct_file, tqdm's monitor):
# each stack is a private mapping of RLIMIT_STACK's size (8 MiB by default) that counts against
# RLIMIT_DATA, touched or not. (Counting two of the three left a save at a quarter of its output in
# headroom failing about one run in three.) The producer runs in the saving thread, whose first
# parallel torch operation may start its OpenMP team: torch.get_num_threads() - 1 more stacks,
# counted in case (see _threads_started).
THREADS_STARTED = 3


def _threads_started() -> int:
    import torch

    return THREADS_STARTED + max(0, torch.get_num_threads() - 1)


def _thread_stack_bytes() -> int:
    size = threading.stack_size()
    if size:
        return size
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return 8 * MIB if soft == resource.RLIM_INFINITY else soft


def _address_space_limit() -> int | None:
    """RLIMIT_DATA, when set: anonymous memory beyond it fails to allocate (what a test cap uses)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft


def in_flight_bytes(output_bytes: int) -> int:
    """What a save of ``output_bytes`` may hold while it merges and writes, its headroom allowing: a
    48th of the output from 24 to 512 MiB, or a 32nd up to 32 MiB where that is more (outputs of
    0.77 to 1.5 GB)."""
    small = min(SMALL_IN_FLIGHT_MAX, output_bytes // SMALL_IN_FLIGHT_SHARE)
    return min(MAX_IN_FLIGHT, max(MIN_IN_FLIGHT, small, output_bytes // IN_FLIGHT_SHARE))


class MemoryBudget:
    """What the save may hold beyond what the process held when it started.

    Attributes:
        limit: ``fraction`` of :func:`memory_limit` (bytes of anonymous memory for the whole process),
            divided among the ``processes`` that save together on this machine (the ranks of a
            collective save on one node).
        allowance: the bytes the save's work may hold at once (never below one small chunk): what
            waits for the writer plus the working set of the tensor being merged
            (:func:`in_flight_bytes` of the ``output_bytes`` this process writes, when the
            headroom allows).
        whole_allowance: the largest tensor a step that needs one whole (fastsave.merge.assemble)
            builds in memory; larger ones are spilled to disk. A quarter of the headroom: such a
            tensor is admitted alone, when nothing waits for the writer.
        check_allowance: the memory an exactness check's reference product may keep beside the
            allowance for the whole save (a 32nd of ``output_bytes``, within a quarter of the
            headroom the allowance leaves; none when minimal): one buffer every check reuses.
        minimal: the allowance is below :data:`MINIMAL_ALLOWANCE`: the smallest working set is kept.
    """

    def __init__(self, fraction: float, processes: int = 1, output_bytes: int = 0) -> None:
        self.fraction = fraction
        self.limit = int(memory_limit() * fraction) // max(1, processes)
        held = anonymous_memory()
        headroom = self.limit - held
        data_limit = _address_space_limit()
        if data_limit is not None:  # RLIMIT_DATA counts virtual size: keep under it with a margin
            virtual = (_status_kib("VmData") or 0) * 1024 + _threads_started() * _thread_stack_bytes()
            headroom = min(headroom, (data_limit - virtual) * 3 // 4)
        self.minimal = headroom < MINIMAL_ALLOWANCE
        in_flight = in_flight_bytes(output_bytes)
        wanted = min(headroom, in_flight) if not self.minimal else headroom // 2
        self.allowance = max(MIN_ALLOWANCE, wanted)
        self.whole_allowance = (
            self.allowance // 2 if self.minimal else max(self.allowance // 2, headroom // 4)
        )
        self.check_allowance = (
            0 if self.minimal else min(output_bytes // CHECK_SHARE, max(0, headroom - self.allowance) // 4)
        )
        if self.minimal:
            bound = (
                f"the process's data limit (RLIMIT_DATA) leaves {max(0, headroom) / 1e6:.0f} MB"
                if data_limit is not None and headroom < self.limit - held
                else f"maximum_memory_usage={fraction:.2f} allows {self.limit / 1e9:.1f} GB and the process "
                f"already holds {held / 1e9:.1f} GB"
            )
            logger.warning(
                "fastsave: %s; keeping the smallest working set (merging in small blocks, one in flight, "
                "anything larger spilled to disk)",
                bound,
            )

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of work fits the allowance at all (else it is produced in pieces or spilled)."""
        return nbytes <= self.allowance


class ByteBudget:
    """A semaphore counted in bytes between the producer thread and the writer.

    Two kinds of bytes are held: the working set of the tensor the producer is computing
    (:meth:`reserve`, one tensor at a time) and the produced pieces waiting for the writer
    (:meth:`acquire`, given back with :meth:`release` once written). A request waits while it would
    take the total past ``limit``, but never while no piece is waiting: the writer could then give
    nothing back, and a request larger than the whole allowance runs alone instead of deadlocking
    (the producer keeps such work small: row blocks, spilled buffers).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # pieces waiting for the writer
        self.reserved = 0  # the working set of the tensor being produced
        self.peak = 0
        self._condition = threading.Condition()

    def _wait(self, nbytes: int, stop: threading.Event | None) -> bool:
        while self.held > 0 and self.reserved + self.held + nbytes > self.limit:
            if stop is not None and stop.is_set():
                return False
            self._condition.wait(timeout=0.1)
        return True

    def reserve(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Hold ``nbytes`` of working set for the next tensor; False when ``stop`` was set while waiting."""
        with self._condition:
            if not self._wait(nbytes, stop):
                return False
            self.reserved = nbytes
            self.peak = max(self.peak, self.reserved + self.held)
            return True

    def settle(self, nbytes: int) -> None:
        """The tensor being produced turned out to hold only ``nbytes`` of working set (its merge
        chose a strategy that needs less than it was reserved with): the rest is free now. Never
        raises the reservation (that would have to wait: :meth:`borrow`)."""
        with self._condition:
            if nbytes < self.reserved:
                self.reserved = max(0, nbytes)
                self._condition.notify_all()

    def unreserve(self) -> None:
        """The tensor is produced: its working set is given back."""
        with self._condition:
            self.reserved = 0
            self._condition.notify_all()

    def acquire(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Wait until a piece of ``nbytes`` fits; False when ``stop`` was set while waiting."""
        return self._admit(nbytes, stop, working=False)

    def release(self, nbytes: int) -> None:
        """A piece of ``nbytes`` was written."""
        self._free(nbytes, working=False)

    def borrow(self, nbytes: int, stop: threading.Event | None = None) -> bool:
        """Add ``nbytes`` to the working set of the tensor being produced, for a while (an exactness
        check's buffer), waiting as :meth:`acquire` does; False when ``stop`` was set while waiting."""
        return self._admit(nbytes, stop, working=True)

    def give_back(self, nbytes: int) -> None:
        """What :meth:`borrow` added is free again."""
        self._free(nbytes, working=True)

    def _admit(self, nbytes: int, stop: threading.Event | None, working: bool) -> bool:
        with self._condition:
            if not self._wait(nbytes, stop):
                return False
            if working:
                self.reserved += nbytes
            else:
                self.held += nbytes
            self.peak = max(self.peak, self.reserved + self.held)
            return True

    def _free(self, nbytes: int, working: bool) -> None:
        with self._condition:
            if working:
                self.reserved -= nbytes
            else:
                self.held -= nbytes
            self._condition.notify_all()


def spill_directory(preferred: Path | None, staging: Path, rank: int | None = None) -> Path:
    """Where spilled buffers go (made on first use): inside ``temporary_location`` when given, else in
    the staging directory's parent, so that the spill shares the disk the checkpoint was checked for.
    ``rank``: in a collective save each rank spills into a directory of its own.

    Spilled files are unlinked as soon as they are mapped, so a killed save leaves at most this empty
    directory, which the next save's cleanup removes with the staging directories of dead saves.
    """
    place = preferred if preferred is not None else staging.parent
    return place / (f"{staging.name}-spill" + (f"-rank{rank}" if rank is not None else ""))


def remove_spill_directory(path: Path | None) -> None:
    """Remove the (empty) spill directory, if it was made."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.rmdir()
