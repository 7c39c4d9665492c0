"""Where a save's time goes: set-up, streaming, finish, and how busy the disk's thread is.

    python benchmarks/save_phases.py --size 250m --rounds 4
    python benchmarks/save_phases.py --size 1b --rounds 3 --work /path/with/room

One process loads the trained QLoRA model (as benchmarks/save_cpu.py's fastsave contender does:
the random bf16 base quantized to NF4 while loading, and the adapter), then, round after round,
writes the bytes of the checkpoint from memory with O_DIRECT, in 16 MiB writes and in one write,
the faster counting (the floor's fastest ways on this project's machines, measured beside every
save because the disk's speed drifts from minute to minute) and saves it with
``save_pretrained_merged(merged_16bit)``. Round 1 is the first save in the process (what a user's
one save costs); later rounds are warm.

Each round also writes the same bytes the same way while this thread runs fastsave's producer
alone (every LoRA weight merged and dropped, over and over until the write ends): the floor
beside the producer, what the disk gives while the CPU and the memory are as busy as a save
keeps them. A save near that column waits for the disk under its own load; the distance between
the two columns is the pipeline's (the hand-over of pieces, the copies, the write sizes).

For each save it records, by wrapping the hand-over of write jobs to the I/O thread
(``AlignedWriter._submit`` for a full buffer and ``AlignedWriter.flush`` for a batch of merged
blocks written from their own memory, on the writer's thread) and the I/O thread's writes
(``JoinedWrites._next_jobs``: the jobs waiting back to back that one write takes;
``AlignedWriter._write_job``: that O_DIRECT write):

  before      from the call to the first job the I/O thread starts (imports, plan, checks)
  streaming   from then to the end of the last write (the header is the last one)
  I/O busy    time the I/O thread spent in its jobs, summed
  no buffer   time the I/O thread had nothing to write: the producer and the writer were behind
  lag         time a job waited for the I/O thread although it was free (thread scheduling, the GIL)
  after       from the last write to the return (fsync of the directory, renames, report)
  in place    the share of the output written from the merged blocks' memory (not copied)
  writes      the I/O thread's writes and the jobs handed to it (fewer writes: jobs were joined)

If I/O busy is most of streaming, the save is bound by how fast the disk takes the save's writes
while the producer computes beside it; if "no buffer" is large, by the producer. The wrapped names
are private: this script follows them when they change.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import SIZES, check_disk, machine, markdown_table, parse_sizes, prepare
from contenders import fastest_direct, load_trained_model, merged_plan, raw_setup


def _instrument(events: list[tuple[str, float]], in_place: list[int]) -> None:
    """Record when each write job (a full buffer, or a batch of merged blocks written from their
    own memory) is handed over, how many jobs each write of the I/O thread takes (it joins the jobs
    waiting back to back) and when it starts and ends; and, per file, the bytes written from the
    blocks' memory."""
    from fastsave.io import direct_file

    writer = direct_file.AlignedWriter
    submit, flush, write_job = writer._submit, writer.flush, writer._write_job
    close = writer.close
    next_jobs = direct_file.JoinedWrites._next_jobs

    def counted_jobs(self):
        group = next_jobs(self)
        if group is not None:
            events.append(("jobs", len(group)))
        return group

    def timed_submit(self) -> None:
        flush_timed(self)  # the batch before the buffer: its own job, handed over first
        events.append(("ready", time.perf_counter()))
        submit(self)

    def flush_timed(self) -> None:
        if self._batch:
            events.append(("ready", time.perf_counter()))
        flush(self)

    def timed_job(job):
        def run(self, *args) -> None:
            events.append(("start", time.perf_counter()))
            try:
                job(self, *args)
            finally:
                events.append(("end", time.perf_counter()))

        return run

    def counted_close(self) -> None:
        in_place.append(self.in_place_bytes)  # one writer per save
        close(self)

    writer._submit, writer.flush, writer.close = timed_submit, flush_timed, counted_close
    writer._write_job = timed_job(write_job)
    direct_file.JoinedWrites._next_jobs = counted_jobs


def phases(events: list[tuple[str, float]], called: float, returned: float) -> dict[str, float]:
    """The phases of one save from its events (see the module's docstring)."""
    ready = [t for kind, t in events if kind == "ready"]
    starts = [t for kind, t in events if kind == "start"]
    ends = [t for kind, t in events if kind == "end"]
    counts = [n for kind, n in events if kind == "jobs"]
    # the header's write goes through _pwrite directly (no job handed over): the data's writes
    # are the first len(counts) writes, each taking the next `count` jobs handed over
    jobs = list(zip(starts, ends, strict=True))
    lag = idle = 0.0
    first = 0  # the index in `ready` of the write's first job
    for i, count in enumerate(counts):
        previous_end = ends[i - 1] if i else ready[first]
        lag += starts[i] - max(ready[first], previous_end)
        idle += max(0.0, ready[first] - previous_end)
        first += count
    return {
        "seconds": returned - called,
        "before": (starts[0] if starts else returned) - called,
        "streaming": (ends[-1] - starts[0]) if starts else 0.0,
        "io_busy": sum(end - start for start, end in jobs),
        "no_buffer": idle,
        "lag": lag,
        "after": returned - (ends[-1] if ends else called),
        "writes": len(counts),
        "jobs": len(ready),
    }


def _beside_the_producer(write: Callable[[], float], plan: Any) -> float:
    """The seconds ``write()`` returns (what it timed), run on a thread of its own while this thread
    produces every merged weight of ``plan`` (and drops it), round after round, until it has ended."""
    done = threading.Event()
    took: list[float] = []

    def timed() -> None:
        try:
            took.append(write())
        finally:
            done.set()

    writer = threading.Thread(target=timed)
    writer.start()
    while not done.is_set():
        for item in plan.items:
            if done.is_set():
                break
            if item.lora_module is not None:
                for _piece in item.pieces():
                    pass
    writer.join()
    return took[0]


def main() -> None:
    """Run the rounds and print one table."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="250m", help=f"one of {', '.join(SIZES)} or HxL")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work", default=None, help="work directory, kept (default: a temporary one)")
    args = parser.parse_args()
    (name, size), *_ = parse_sizes(args.size).items()
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastsave-phases-"))
    try:
        work = root / name
        record = prepare(work, size)
        check_disk(work, 2 * record["output_bytes"])
        # the floor's own memory (private, in huge pages where the kernel gives them): a shared
        # mapping's 4 KiB pages, which this script once wrote from, took the disk 1.1-1.5x as long
        data = raw_setup({"output_bytes": record["output_bytes"]})["data"]
        model = load_trained_model({"work": str(work)})["model"]
        plan = None  # built after the first save, which pays for its own imports and checks
        import fastsave

        events: list[tuple[str, float]] = []
        in_place: list[int] = []
        _instrument(events, in_place)
        out = work / "phases-out"
        rows = []
        for round_ in range(1, max(1, args.rounds) + 1):
            floor = fastest_direct(data, str(work / "raw.bin"))
            shutil.rmtree(out, ignore_errors=True)
            events.clear()
            in_place.clear()
            called = time.perf_counter()
            fastsave.save_pretrained_merged(model, out, save_method="merged_16bit")
            got = phases(events, called, time.perf_counter())
            # after the save, so that round 1's save is the process's first (its one-time checks)
            plan = plan if plan is not None else merged_plan(model)
            beside = _beside_the_producer(lambda: fastest_direct(data, str(work / "raw.bin")), plan)
            rows.append(
                [
                    str(round_),
                    f"{floor:.3f}",
                    f"{got['seconds']:.3f}",
                    f"{got['seconds'] / floor:.2f}x",
                    f"{beside:.3f}",
                    f"{got['seconds'] / beside:.2f}x",
                    f"{got['before']:.3f}",
                    f"{got['streaming']:.3f}",
                    f"{got['io_busy']:.3f} ({got['io_busy'] / max(got['streaming'], 1e-9):.0%})",
                    f"{got['no_buffer']:.3f}",
                    f"{got['lag']:.3f}",
                    f"{got['after']:.3f}",
                    f"{record['output_bytes'] / max(got['io_busy'], 1e-9) / 1e9:.2f}",
                    f"{sum(in_place) / record['output_bytes']:.0%}",
                    f"{got['writes']} / {got['jobs']}",
                ]
            )
            print(
                f"round {round_}: floor {floor:.3f} s, beside the producer {beside:.3f} s, "
                f"save {got['seconds']:.3f} s",
                flush=True,
            )
        shutil.rmtree(out, ignore_errors=True)
        print(f"\n### {name}: {size.describe()}; {record['output_bytes'] / 1e6:.0f} MB out; {machine()}\n")
        header = [
            "round",
            "floor (O_DIRECT) s",
            "save s",
            "x floor",
            "floor beside the producer s",
            "x that",
            "before s",
            "streaming s",
            "I/O busy s (of streaming)",
            "no buffer s",
            "lag s",
            "after s",
            "GB/s while busy",
            "written in place",
            "writes / jobs",
        ]
        print(markdown_table(header, rows))
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
