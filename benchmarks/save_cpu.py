"""CPU benchmark: how fast, and in how much memory, a merged 16-bit checkpoint is written.

    python benchmarks/save_cpu.py                       # 250m, 1b and 3b, fastest of 3 runs each
    python benchmarks/save_cpu.py --sizes 250m --repeat 5 --json results.json
    python benchmarks/save_cpu.py --sizes 1024x8 --contenders raw,fastsave

The model: a random Llama-3-proportioned checkpoint built from a config (head_dim 128, 4 query
heads per KV head, MLP 3.5x hidden, vocab 32000, untied lm_head), saved in bf16, and a LoRA
adapter (r=16, alpha=32, random non-zero B) on every linear. Sizes: 250m (hidden 1024, 14
layers), 1b (2048, 16), 3b (3072, 24), or HIDDENxLAYERS; and qwen0.5b, Qwen2.5-0.5B's shape
(Qwen2: hidden 896, 24 layers, MLP 4864, a tied 151936-word embedding, biases on q/k/v), which
saves differently (its biases leave the weights off the 4 KiB blocks, its embedding is 28% of
the bytes). Nothing is downloaded.

Contenders, each run alone in a fresh process (benchmarks/contenders.py), interleaved over
--repeat rounds so that a slow spell of the disk hits all of them; the fastest run counts for
time, the largest for memory. On a small shared machine other processes distort timings far
beyond their share (torch's OpenMP threads spin while one of them waits for a core): before each
run the script waits (--idle-wait) for the CPUs to go quiet, and a run during which others used
more than --disturbed of the CPUs is repeated (--retries) and counts only when no quiet run exists.

  raw write   the checkpoint's number of bytes written from memory + fsync, the fastest of: one
              write call, 16 MiB writes, a thread per core, O_DIRECT in 16 MiB writes and in
              one write (where allowed): the floor (fastsave's runs also measure it paired: the
              same bytes written both O_DIRECT ways in the same process right after each save,
              the faster counting, reported as the median of the per-run ratios;
              a virtual disk's speed drifts by 20% and more between minutes, and --no-paired-floor
              turns it off)
  fastsave    save_pretrained_merged(merged_16bit) of the 4-bit peft model held in memory
  peft        the usual route: load the 16-bit base + adapter, merge_and_unload, save_pretrained,
              fsync (save_pretrained alone does not; the time before it is in the JSON)
  cli         `fastsave merge ADAPTER OUT` (its main(), imports done before the clock starts;
              "process" is the whole command's wall time) on the saved adapter + 16-bit base
  cli-original  the same with --base-weights original: the base as it is on disk, no NF4 round
              trip (the default path's target: within 1.3x of this)
  loop        merge compute alone: per LoRA-wrapped 4-bit linear, bitsandbytes' float32
              dequantize, addmm of the delta, cast to bf16; nothing written
  producer    fastsave's producer alone: every planned tensor's produce() in plan order, nothing
              written (rate over the LoRA weights; build_plan's time reported beside)

Memory, for the timed part only (the process's state before it is "held"): extra VmHWM (peak
RSS, reset before the job, page cache of mapped files included) and extra RssAnon (anonymous
memory, sampled every --sample-ms by a thread in the last --sample-rounds rounds, since the
sampler's GIL use slows the job), both over what was held before the job.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (
    SIZES,
    ModelSize,
    check_disk,
    machine,
    markdown_table,
    mib,
    parse_sizes,
    prepare_in_subprocess,
    run_contender,
    wait_for_idle,
)

CONTENDERS = ("raw", "fastsave", "peft", "cli", "cli-original", "loop", "producer")
LABELS = {
    "raw": "raw write + fsync of the same bytes (fastest way)",
    "fastsave": "fastsave save_pretrained_merged (4-bit peft model in memory)",
    "peft": "peft recipe: load 16-bit + adapter, merge_and_unload, save_pretrained, fsync",
    "cli": "`fastsave merge ADAPTER OUT` (saved adapter + 16-bit base on disk)",
    "cli-original": "`fastsave merge ... --base-weights original` (no NF4 round trip)",
}
WRITERS = tuple(LABELS)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_size(name: str, size: ModelSize, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare one model size and run every contender --repeat times, interleaved."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n[{name}] preparing {size.describe()} in {work} ...", flush=True)
    prequantized = bool({"loop", "producer"} & set(args.contenders))
    model = prepare_in_subprocess(work, size, args.rank, prequantized)
    check_disk(work, 2 * model["output_bytes"] + (1 << 30))  # one output and its staging, at a time
    runs: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for round_ in range(args.repeat):
        for contender in args.contenders:
            out = work / f"out-{contender}"
            _remove(out)  # every run writes a fresh output, as a user's first save does
            # The sampling thread takes the GIL every few ms (measured: up to ~20% on a 1 s save), so
            # only the last --sample-rounds rounds sample RssAnon; the others time the job alone.
            sampled = round_ >= args.repeat - args.sample_rounds
            params = {
                "work": str(work),
                "out": str(out),
                "output_bytes": model["output_bytes"],
                "sample_ms": args.sample_ms if sampled else 0,
                "paired_floor": contender == "fastsave" and args.paired_floor,
            }
            for attempt in range(1 + args.retries):
                busy = wait_for_idle(args.idle_wait) if args.idle_wait > 0 else None
                result = run_contender(contender, params, timeout=args.timeout)
                result["machine_busy_before"] = busy
                _remove(out)
                runs[contender].append(result)
                status = f"{result['seconds']:.2f}s" if result["outcome"] == "ok" else result["outcome"]
                if result.get("paired_floor_seconds"):
                    status += f" (the floor right after: {result['paired_floor_seconds']:.2f}s)"
                if result.get("others_cpu_share") is not None:
                    status += f" (other processes used {100 * result['others_cpu_share']:.0f}% of the CPUs)"
                print(f"[{name}] round {round_ + 1}/{args.repeat} {contender}: {status}", flush=True)
                if result["outcome"] != "ok":
                    print(result.get("error") or result.get("stderr_tail", "")[-1500:], flush=True)
                    break
                if not _disturbed(result, args.disturbed) or attempt == args.retries:
                    break
                print(f"[{name}]   disturbed: again ({attempt + 1}/{args.retries})", flush=True)
    best = summarize(runs, args.disturbed)
    return {"size": name, "model": model, "describe": size.describe(), "runs": runs, "best": best}


def _disturbed(result: dict, threshold: float) -> bool:
    """Whether other processes used more than ``threshold`` of the CPUs during the run."""
    return (result.get("others_cpu_share") or 0.0) > threshold


def summarize(runs: dict[str, list[dict]], disturbed: float = 0.10) -> dict[str, dict]:
    """Per contender: the fastest successful run's seconds, the largest extra memory of any run.

    Runs that other processes disturbed (more than ``disturbed`` of the CPUs) count only when no
    undisturbed run succeeded; "disturbed" in the result says so.
    """
    best: dict[str, dict] = {}
    for contender, results in runs.items():
        ok = [r for r in results if r["outcome"] == "ok"]
        quiet = [r for r in ok if not _disturbed(r, disturbed)]
        all_disturbed = bool(ok) and not quiet
        ok = quiet or ok
        if not ok:
            best[contender] = {"outcome": results[-1]["outcome"] if results else "not run"}
            continue
        # the raw floor: the fastest way of writing the bytes within each run (not the sum of the ways)
        seconds_of = (
            (lambda r: r.get("floor_seconds", r["seconds"]))
            if contender == "raw"
            else (lambda r: r["seconds"])
        )
        fastest = min(ok, key=seconds_of)
        entry = {
            "outcome": "ok",
            "runs": len(ok),
            "seconds": seconds_of(fastest),
            "process_seconds": min(r["process_seconds"] for r in ok),
            "held": fastest["held"],
            "extra": {
                key: max(r["extra"].get(key, 0) for r in ok) for key in {k for r in ok for k in r["extra"]}
            },
            "others_cpu_share": fastest.get("others_cpu_share"),
            "disturbed": all_disturbed,
        }
        if contender == "raw" and "ways" in fastest:
            entry["ways"], entry["floor_way"] = fastest["ways"], fastest["floor_way"]
        paired = [r["seconds"] / r["paired_floor_seconds"] for r in ok if r.get("paired_floor_seconds")]
        if paired:
            entry["paired_ratios"] = paired
            entry["paired_ratio"] = statistics.median(paired)
        for key in ("merged_parameters", "merged_seconds", "plan_seconds", "seconds_before_fsync"):
            if key in fastest:
                entry[key] = min(r[key] for r in ok) if key.endswith("seconds") else fastest[key]
        best[contender] = entry
    return best


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or a.get("outcome") != "ok" or b.get("outcome") != "ok":
        return "-"
    return f"{a['seconds'] / b['seconds']:.2f}x"


def paired_ratio(entry: dict | None) -> str:
    """The median of a contender's ratios to the floor measured right after each run ("-": none)."""
    if not entry or entry.get("outcome") != "ok" or "paired_ratio" not in entry:
        return "-"
    return f"{entry['paired_ratio']:.2f}x"


def report(result: dict[str, Any], repeat: int) -> str:
    """The markdown tables of one size."""
    best, out_bytes = result["best"], result["model"]["output_bytes"]
    lines = [
        f"\n### {result['size']}: {result['describe']}; {out_bytes / 1e6:.0f} MB bf16 out, "
        f"LoRA r={result['model']['rank']} on every linear; {machine()}; fastest undisturbed run of {repeat} rounds\n"
    ]
    rows = []
    for contender in (c for c in WRITERS if c in best):
        entry = best[contender]
        if entry["outcome"] != "ok":
            rows.append([LABELS[contender], entry["outcome"], *["-"] * 7])
            continue
        anon = entry["extra"].get("RssAnon")
        seconds = f"{entry['seconds']:.2f}" + (" (disturbed)" if entry.get("disturbed") else "")
        if contender.startswith("cli"):
            seconds += f" (process {entry['process_seconds']:.1f})"
        rows.append(
            [
                LABELS[contender],
                seconds,
                _ratio(entry, best.get("raw")),
                _ratio(entry, best.get("peft")),
                mib(entry["extra"]["VmHWM"]),
                mib(anon),
                "-" if anon is None else f"{100 * anon / out_bytes:.0f}%",
                f"{mib(entry['held']['VmRSS'])} / {mib(entry['held']['RssAnon'])}",
                f"{100 * (entry.get('others_cpu_share') or 0):.0f}%",
            ]
        )
    header = [
        "contender",
        "seconds",
        "vs raw write",
        "vs peft recipe",
        "extra peak VmHWM (MiB)",
        "extra peak RssAnon (MiB)",
        "RssAnon extra / output",
        "held before: RSS / anon (MiB)",
        "CPU used by others",
    ]
    lines.append(markdown_table(header, rows))
    raw = best.get("raw", {})
    if raw.get("ways"):
        ways = ", ".join(f"{way} {seconds:.2f} s" for way, seconds in raw["ways"].items())
        lines.append(f"\nraw write, each way in its fastest run: {ways}; the floor is {raw['floor_way']}")
    fastsave = best.get("fastsave", {})
    if fastsave.get("paired_ratios"):
        ratios = ", ".join(f"{ratio:.2f}x" for ratio in fastsave["paired_ratios"])
        lines.append(
            f"\nfastsave against the floor measured in the same process right after each save "
            f"(O_DIRECT, the same bytes, the same directory): {ratios}; median {fastsave['paired_ratio']:.2f}x"
        )
    compute = []
    lora_params = result["model"]["lora_parameters"]

    def rate_row(label: str, run: dict, seconds: float, notes: list[str]) -> list[str]:
        notes = notes + (["disturbed"] if run.get("disturbed") else [])
        rate = run["merged_parameters"] / seconds / 1e9
        return [label, f"{seconds:.2f}", f"{rate:.2f}", "; ".join(notes) or "-"]

    if best.get("loop", {}).get("outcome") == "ok":
        loop = best["loop"]
        compute.append(
            rate_row("plain loop: bnb float32 dequantize + addmm + cast to bf16", loop, loop["seconds"], [])
        )
    if best.get("producer", {}).get("outcome") == "ok":
        producer = best["producer"]
        notes = [f"all tensors {producer['seconds']:.2f} s", f"build_plan {producer['plan_seconds']:.3f} s"]
        compute.append(
            rate_row(
                "fastsave producer, LoRA weights (no writer)", producer, producer["merged_seconds"], notes
            )
        )
    if compute:
        lines.append(
            f"\nmerge compute over the {lora_params / 1e6:.0f} M LoRA-wrapped parameters, nothing written:\n"
        )
        lines.append(markdown_table(["merge compute", "seconds", "Gparam/s", "note"], compute))
    return "\n".join(lines)


def scaling_table(results: list[dict[str, Any]]) -> str:
    """One row per size: time and memory side by side, so that linear cost shows."""
    rows = []
    for result in results:
        best, out_bytes = result["best"], result["model"]["output_bytes"]

        def seconds(contender: str, best=best) -> str:
            entry = best.get(contender, {})
            return f"{entry['seconds']:.2f}" if entry.get("outcome") == "ok" else entry.get("outcome", "-")

        def anon(contender: str, best=best, out_bytes=out_bytes) -> str:
            entry = best.get(contender, {})
            if entry.get("outcome") != "ok" or "RssAnon" not in entry["extra"]:
                return "-"
            return f"{mib(entry['extra']['RssAnon'])} ({100 * entry['extra']['RssAnon'] / out_bytes:.0f}%)"

        def rate(contender: str, key: str, best=best) -> str:
            entry = best.get(contender, {})
            if entry.get("outcome") != "ok":
                return "-"
            return f"{entry['merged_parameters'] / entry[key] / 1e9:.2f}"

        rows.append(
            [
                result["size"],
                f"{result['model']['parameters'] / 1e9:.2f}",
                f"{out_bytes / 1e6:.0f}",
                seconds("raw"),
                seconds("fastsave"),
                seconds("peft"),
                seconds("cli"),
                _ratio(best.get("fastsave"), best.get("raw")),
                paired_ratio(best.get("fastsave")),
                _ratio(best.get("fastsave"), best.get("peft")),
                anon("fastsave"),
                anon("peft"),
                anon("cli"),
                rate("loop", "seconds"),
                rate("producer", "merged_seconds"),
            ]
        )
    header = [
        "size",
        "B params",
        "MB out",
        "raw s",
        "fastsave s",
        "peft s",
        "cli s",
        "fastsave / raw",
        "fastsave / floor right after (median)",
        "fastsave / peft",
        "fastsave extra anon MiB (% out)",
        "peft extra anon",
        "cli extra anon",
        "loop Gparam/s",
        "producer Gparam/s",
    ]
    return markdown_table(header, rows)


def main() -> None:
    """Run the benchmark, print markdown tables, optionally write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="250m,1b,3b", help=f"comma list of {', '.join(SIZES)} or HxL")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (fastest run counts; default 3)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sample-ms", type=float, default=2.0, help="RssAnon sampling interval (0: off)")
    parser.add_argument(
        "--sample-rounds",
        type=int,
        default=1,
        help="how many of the last rounds sample RssAnon (the sampler slows a job down; default 1)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one contender may take")
    parser.add_argument(
        "--disturbed",
        type=float,
        default=0.10,
        help="a run during which other processes used more than this share of the CPUs is disturbed: "
        "it is run again (--retries) and counts only if no undisturbed run succeeded (default 0.10)",
    )
    parser.add_argument("--retries", type=int, default=2, help="extra runs after a disturbed one (default 2)")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for other processes to leave the CPUs (0: no)",
    )
    parser.add_argument(
        "--paired-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each fastsave run, time the floor's O_DIRECT writes of the same bytes in the same "
        "process, the faster of two ways (not part of the run's time or memory; default on)",
    )
    parser.add_argument("--work", default=None, help="work directory, kept (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write every run's result here")
    args = parser.parse_args()
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    args.repeat = max(1, args.repeat)
    sizes = parse_sizes(args.sizes)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastsave-bench-"))
    results = []
    try:
        for name, size in sizes.items():
            results.append(run_size(name, size, root / name, args))
            print(report(results[-1], args.repeat), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    if len(results) > 1:
        print("\n### all sizes\n")
        print(scaling_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
