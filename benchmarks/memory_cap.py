"""Memory-cap harness: does a merged save complete, exactly, when the process may hold little more?

    python benchmarks/memory_cap.py                          # size "test", headroom 25% of the output
    python benchmarks/memory_cap.py --size 1b --headroom 0.25 --contenders fastsave,peft
    python benchmarks/memory_cap.py --size 250m --find-min   # the smallest headroom that works today
    python benchmarks/memory_cap.py --size test --json result.json  (what tests/test_memory_cap.py runs)

Each contender runs in a fresh process (benchmarks/contenders.py) that first sets up, then caps
its own data segment with ``resource.setrlimit(RLIMIT_DATA)`` at what it holds (VmData) plus the
headroom, then does its job. "fastsave" loads the trained 4-bit peft model (what a user holds after
training) and saves merged_16bit, checked tensor by tensor against bitsandbytes' float32
dequantize + peft's delta, rounded once. "peft" runs the usual recipe (load the 16-bit base +
adapter, merge_and_unload, save_pretrained) and "cli" runs ``fastsave merge``; neither holds a
model before its job, so each gets the same headroom over what its libraries hold.
"fastsave-whole-products" is "fastsave" with every LoRA product check failing (the path a shape
takes whose BLAS blocks lack the whole product's bits: rows read from the whole product, computed
once), checked the same way.

What RLIMIT_DATA limits (Linux >= 4.7, measured here with glibc 2.36 and torch 2.13): VmData, the
process's private writable mappings, counted when they are mapped, not when touched. It includes
malloc's heap and every mmap torch's allocator makes for a large tensor, the stack of every new
thread (8 MiB each by default), and a safetensors file opened with safe_open (safetensors 0.8
maps it private and writable: its whole size counts, although its pages are clean page cache).
Read-only or shared file mappings do not count. A refused allocation surfaces as torch's
"DefaultCPUAllocator: can't allocate memory", Python's MemoryError, or "unable to mmap ... Cannot
allocate memory" from safetensors; the harness reports which, with the traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import SIZES, MiB, markdown_table, mib, parse_sizes, prepare, run_contender

CONTENDERS = ("fastsave", "peft", "cli", "fastsave-whole-products")


def capped_run(
    contender: str,
    work: Path,
    headroom_bytes: int,
    timeout: float | None = None,
    threads: int | None = None,
) -> dict:
    """Run ``contender`` with RLIMIT_DATA = what it holds after setup + ``headroom_bytes``.

    ``threads``: torch's thread count in the child (None: every core).
    """
    out = work / f"out-capped-{contender}"
    shutil.rmtree(out, ignore_errors=True)
    params = {
        "work": str(work),
        "out": str(out),
        "cap": {"headroom_bytes": int(headroom_bytes)},
        "verify": contender.startswith("fastsave"),
        "threads": threads,
    }
    try:
        return run_contender(contender, params, timeout=timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def passed(result: dict) -> bool:
    """The save completed (and, where checked, is exact)."""
    return result["outcome"] == "ok" and result.get("verify", {"exact": True})["exact"]


def smallest_headroom(
    work: Path,
    output_bytes: int,
    contender: str = "fastsave",
    start: int | None = None,
    confirm: int = 2,
    threads: int | None = None,
) -> dict[str, Any]:
    """Bisect the smallest headroom (bytes) with which ``contender`` passes, to 1 MiB or 1% of the output.

    How much a save holds at its peak depends on thread timing (how far the producer runs ahead
    of the writer), so the value found is run ``confirm`` more times and raised by the resolution
    until every run passes.
    """
    resolution = max(MiB, output_bytes // 100)
    probes: list[tuple[int, bool]] = []

    def probe(headroom: int) -> bool:
        ok = passed(capped_run(contender, work, headroom, threads=threads))
        probes.append((headroom, ok))
        print(f"  headroom {headroom / MiB:.0f} MiB: {'passes' if ok else 'fails'}", flush=True)
        return ok

    high = start or output_bytes // 4
    low = 0
    while not probe(high):
        low = high
        high *= 2
        if high > 8 * output_bytes:
            return {"smallest_bytes": None, "probes": probes}
    while high - low > resolution:
        middle = (low + high) // 2
        if probe(middle):
            high = middle
        else:
            low = middle
    while not all(probe(high) for _ in range(confirm)):
        high += resolution
    return {"smallest_bytes": high, "resolution_bytes": resolution, "probes": probes}


def describe(result: dict) -> str:
    """The outcome in a few words, for the table."""
    if result["outcome"] == "ok":
        verify = result.get("verify")
        return "completed" + ("" if verify is None else ", exact" if verify["exact"] else ", NOT EXACT")
    if result["outcome"] == "failed":
        kind = "out of memory" if result.get("out_of_memory") else "error"
        return f"{kind}: {result['error_type']}: {result['error'][:120]}"
    return result["outcome"]


def main() -> None:
    """Run the capped saves and print a table; --find-min also bisects the smallest headroom."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="test", help=f"one of {', '.join(SIZES)} or HIDDENxLAYERS")
    parser.add_argument("--headroom", type=float, default=0.25, help="fraction of the output size")
    parser.add_argument(
        "--contenders", default="fastsave,peft", help=f"comma list of {', '.join(CONTENDERS)}"
    )
    parser.add_argument(
        "--find-min", action="store_true", help="bisect the smallest headroom fastsave passes with"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="contenders run at once (timings are not compared)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per contender (default: all cores)"
    )
    parser.add_argument("--work", default=None, help="work directory, kept (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    (name, size), *_ = parse_sizes(args.size).items()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if set(contenders) - set(CONTENDERS):
        parser.error(f"unknown contenders; known: {', '.join(CONTENDERS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastsave-memcap-"))
    try:
        model = prepare(work, size)
        headroom = int(args.headroom * model["output_bytes"])
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = dict(
                zip(
                    contenders,
                    pool.map(lambda c: capped_run(c, work, headroom, args.timeout, args.threads), contenders),
                    strict=True,
                )
            )
        report: dict[str, Any] = {"size": name, "model": model, "headroom_bytes": headroom, "runs": runs}
        print(
            f"\n{size.describe()}; {model['output_bytes'] / 1e6:.0f} MB bf16 out; RLIMIT_DATA = VmData after "
            f"setup + {headroom / MiB:.0f} MiB ({100 * args.headroom:.0f}% of the output)\n"
        )
        rows = []
        for contender, result in runs.items():
            held = result.get("held", {})
            extra = result.get("extra", {})
            rows.append(
                [
                    contender,
                    mib(held.get("VmData")),
                    mib(result.get("cap_bytes")),
                    describe(result),
                    mib(extra.get("VmData")),
                    mib(extra.get("RssAnon")),
                ]
            )
        header = [
            "contender",
            "held VmData (MiB)",
            "cap (MiB)",
            "outcome",
            "extra VmData peak",
            "extra RssAnon",
        ]
        print(markdown_table(header, rows))
        if args.find_min:
            print(f"\nsmallest headroom for fastsave ({name}):", flush=True)
            found = smallest_headroom(work, model["output_bytes"], threads=args.threads)
            report["smallest_headroom"] = found
            if found["smallest_bytes"] is None:
                print("  none up to 8x the output size")
            else:
                print(
                    f"  {found['smallest_bytes'] / MiB:.0f} MiB = "
                    f"{100 * found['smallest_bytes'] / model['output_bytes']:.0f}% of the output"
                )
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
