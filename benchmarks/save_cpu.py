"""CPU benchmark: fastsave merged_16bit vs the usual peft route, and a raw disk write of the same bytes.

Every contender runs in its own process so that its peak RSS is its own (VmHWM): for fastsave the
peak during the save (the peak mark is reset after loading the model, which it still holds), for the
others the whole process: the peft route's timed part includes loading the 16-bit base.
Nothing is downloaded: the base model is built from a config with random weights.

    python benchmarks/save_cpu.py [--hidden 1024 --layers 12 --vocab 32000 --rank 16 --repeat 3]

Each contender runs --repeat times, interleaved (raw, fastsave, peft, raw, ...) so that a slow
spell of the disk hits all of them; the table gives each one's fastest run and its largest peak RSS.

Contenders, all writing a bf16 safetensors checkpoint of the same model:
  fastsave      4-bit QLoRA model in memory -> save_pretrained_merged (merged into the NF4 weights)
  peft+16bit    the common route: load the 16-bit base + PeftModel.from_pretrained(adapter)
                -> merge_and_unload() -> save_pretrained (merged into the original 16-bit weights)
  raw write     numpy writes the same number of bytes to the same disk (the bar to get close to)
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(os.cpu_count())
args = json.loads(sys.argv[1])


def _status_mib(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    # Return what the process holds now, in MiB, and reset the kernel's peak-RSS mark (Linux
    # clear_refs 5) so that the peak reported afterwards is the timed part's own. malloc_trim
    # first: memory freed while loading must not hide the save's own allocations.
    import ctypes, gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def peak_rss():
    # this process's own peak since exec (VmHWM), not ru_maxrss, which keeps the forking parent's
    peak = _status_mib("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


work = args["work"]
if args["mode"] == "fastsave":
    from peft import PeftModel
    from fastsave.tiny import load_4bit
    import fastsave
    model = PeftModel.from_pretrained(load_4bit(work + "/base"), work + "/adapter")
    held = reset_peak_rss()  # the save's own peak, not that of loading the model
    start = time.perf_counter()
    fastsave.save_pretrained_merged(model, work + "/out-fastsave", max_shard_size="5GB")
    print(json.dumps({"seconds": time.perf_counter() - start, "held_mib": held, "peak_mib": peak_rss()}))
elif args["mode"] == "peft":
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(work + "/base", dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, work + "/adapter").merge_and_unload()
    merged.save_pretrained(work + "/out-peft")
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": peak_rss()}))
else:
    import numpy as np
    data = np.random.default_rng(0).integers(0, 255, size=args["bytes"], dtype=np.uint8)
    start = time.perf_counter()
    with open(work + "/raw.bin", "wb") as handle:
        handle.write(memoryview(data))
        handle.flush()
        os.fsync(handle.fileno())
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": peak_rss()}))
"""


def run_child(mode: str, work: str, nbytes: int = 0) -> dict:
    """Run one contender in a fresh process; return its seconds and peak RSS."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps({"mode": mode, "work": work, "bytes": nbytes})],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=work,  # never the repo root: its kernels/ folder must not shadow the `kernels` package
    )
    out = proc.stdout.read().decode()
    if proc.wait() != 0:
        raise RuntimeError(f"{mode} failed with status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = result["peak_mib"]
    return result


def prepare(work: Path, hidden: int, layers: int, vocab: int, rank: int) -> int:
    """Write the random base and a trained-looking (random, non-zero) adapter; return output bytes."""
    from fastsave.tiny import attach_lora, load_4bit, save_random_model, tiny_llama_config

    config = tiny_llama_config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 3.5) // 256 * 256,  # Llama-3's ratio (4096 -> 14336)
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,  # head_dim 128, 4 query heads per KV head, as in Llama-3
        num_key_value_heads=max(1, hidden // 512),
    )
    save_random_model(config, work / "base")
    model = attach_lora(load_4bit(work / "base"), r=rank, alpha=2 * rank)
    model.save_pretrained(work / "adapter")
    from safetensors import safe_open

    with safe_open(work / "base" / "model.safetensors", framework="pt") as handle:
        return sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys()) * 2  # noqa: SIM118


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (the fastest counts)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="fastsave-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # prepared in a process of its own: this one must stay small, or every contender it forks
    # would start with a large peak-RSS mark
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        nbytes = pool.submit(prepare, work, args.hidden, args.layers, args.vocab, args.rank).result()
    contenders = {
        "raw write": ("raw", "raw.bin"),
        "fastsave": ("fastsave", "out-fastsave"),
        "peft+16bit": ("peft", "out-peft"),
    }
    results: dict[str, dict] = {}
    for _ in range(max(1, args.repeat)):
        for name, (mode, output) in contenders.items():
            _remove(work / output)  # every run writes a fresh output, as a user's first save does
            run = run_child(mode, str(work), nbytes)
            best = results.setdefault(name, run)
            best["seconds"] = min(best["seconds"], run["seconds"])
            best["peak_rss_mib"] = max(best["peak_rss_mib"], run["peak_rss_mib"])
            if run.get("held_mib"):
                best["held_mib"] = max(best.get("held_mib") or 0, run["held_mib"])
    raw = results["raw write"]["seconds"]
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.rank} on all linears; "
        f"output {nbytes / 1e6:.0f} MB bf16; {os.cpu_count()} CPU cores; fastest of {max(1, args.repeat)} runs each\n"
    )
    print("| contender | seconds | vs raw write | peak RSS (MiB) | throughput (MB/s) |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        seconds = result["seconds"]
        print(
            f"| {name} | {seconds:.2f} | {seconds / raw:.2f}x | {result['peak_rss_mib']:.0f} | {nbytes / 1e6 / seconds:.0f} |"
        )
    held = results["fastsave"].get("held_mib")
    if held:
        print(
            f"\nfastsave held {held:.0f} MiB (the 4-bit model) before saving; "
            f"the save added {results['fastsave']['peak_rss_mib'] - held:.0f} MiB at its peak"
        )
    print(
        f"\nfastsave / peft+16bit time ratio: {results['fastsave']['seconds'] / results['peft+16bit']['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
