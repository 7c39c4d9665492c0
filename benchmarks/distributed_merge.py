"""``fastsave merge`` on 1 rank vs N ranks (torchrun, gloo): time and per-rank peak memory.

    python benchmarks/distributed_merge.py [--hidden 1024 --layers 12 --vocab 32000 --world 2 --repeat 3]

Builds the random Llama-shaped base and LoRA adapter of benchmarks/save_cpu.py (nothing is
downloaded), then runs, interleaved ``--repeat`` times, the same merge (default
``--base-weights dequantized``: each 4-bit-quantized weight goes through the NF4 round trip, the
LoRA delta is added, and the result is written) once as ``python -m fastsave merge`` and once as
``torchrun --nproc-per-node N -m fastsave merge``. Each rank reports, from inside the process:

- ``merge s``: the merge itself (fastsave.cli.main, after the imports), on that rank;
- ``held MiB``: what the process held before the merge (the libraries);
- ``peak MiB``: its peak RSS during the merge (the kernel's mark is reset just before it);
- ``CPU s``: the CPU time the merge used on that rank (all its threads).

``wall s`` is the whole command as a user runs it (process start, imports, the merge). The
outputs are compared byte for byte. With ``--threads`` every process uses that many torch
threads; by default a single rank uses all cores and N ranks share them (cores // N each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import torch

def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

def reset_peak():
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mib("VmRSS")

torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
import fastsave.api, fastsave.cli  # the imports are not the merge
from fastsave.cli import main
held = reset_peak()
cpu = os.times()
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
after = os.times()
rank = int(os.environ.get("RANK", 0))
report = {"rank": rank, "code": code, "seconds": seconds, "held_mib": held, "peak_mib": status_mib("VmHWM"),
          "cpu_s": (after.user - cpu.user) + (after.system - cpu.system)}
with open(os.path.join(os.environ["BENCH_REPORTS"], f"rank{rank}.json"), "w") as handle:
    json.dump(report, handle)
"""


def run(world: int, work: Path, out: Path, shard: str, threads: int) -> dict:
    """One merge on ``world`` ranks; returns the wall time and each rank's report."""
    script = work / "bench_child.py"
    script.write_text(CHILD)
    args = ["merge", str(work / "adapter"), str(out), "--base", str(work / "base"), "--max-shard-size", shard]
    if world == 1:
        command = [sys.executable, str(script), *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(world),
            str(script),
            *args,
        ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "BENCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    reports = work / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    env["BENCH_REPORTS"] = str(reports)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{world} rank(s) failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(reports.glob("rank*.json"))]
    return {"wall": wall, "ranks": sorted(ranks, key=lambda r: r["rank"])}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def main() -> None:
    """Run the comparison and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--world", type=int, default=2, help="ranks of the distributed run")
    parser.add_argument("--shard", default="100MB", help="max shard size (the ranks share shards)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / ranks)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import ModelSize, prepare

    work = Path(args.dir or tempfile.mkdtemp(prefix="fastsave-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "adapter").is_dir():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            size = ModelSize(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
            pool.submit(prepare, work, size, args.rank).result()
    cores = os.cpu_count() or 1
    runs: dict[int, list[dict]] = {1: [], args.world: []}
    for _ in range(max(1, args.repeat)):
        for world in runs:
            out = work / f"out-{world}"
            shutil.rmtree(out, ignore_errors=True)
            threads = args.threads or max(1, cores // world)
            runs[world].append(run(world, work, out / "out", args.shard, threads))
    same = _files(work / "out-1" / "out") == _files(work / f"out-{args.world}" / "out")
    size = sum(p.stat().st_size for p in (work / "out-1" / "out").glob("*.safetensors"))
    shards = len(list((work / "out-1" / "out").glob("*.safetensors")))
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.rank}; output "
        f"{size / 1e6:.0f} MB bf16 in {shards} shards; {cores} CPU cores; {args.repeat} runs each "
        f"(min-max); outputs byte-identical: {same}\n"
    )
    print(
        "| ranks | wall s (command) | merge s (slowest rank) | CPU s per rank | held MiB per rank | peak MiB per rank |"
    )
    print("|---|---|---|---|---|---|")
    for world, results in runs.items():
        walls = [r["wall"] for r in results]
        merges = [max(rank["seconds"] for rank in r["ranks"]) for r in results]
        held = [rank["held_mib"] for r in results for rank in r["ranks"]]
        peaks = [rank["peak_mib"] for r in results for rank in r["ranks"]]
        cpus = [rank["cpu_s"] for r in results for rank in r["ranks"]]
        print(
            f"| {world} | {min(walls):.1f}-{max(walls):.1f} | {min(merges):.1f}-{max(merges):.1f} | "
            f"{min(cpus):.1f}-{max(cpus):.1f} | {min(held):.0f}-{max(held):.0f} | {min(peaks):.0f}-{max(peaks):.0f} |"
        )
    print("\nper run:", json.dumps(runs))


if __name__ == "__main__":
    main()
