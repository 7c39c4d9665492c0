"""CPU benchmark: fastsave merged_16bit vs the usual peft route, and a raw disk write of the same bytes.

Every contender runs in its own process so that its peak RSS is its own (os.wait4's ru_maxrss).
Nothing is downloaded: the base model is built from a config with random weights.

    python benchmarks/save_cpu.py [--hidden 1024 --layers 12 --vocab 32000 --rank 16]

Contenders, all writing a bf16 safetensors checkpoint of the same model:
  fastsave      4-bit QLoRA model in memory -> save_pretrained_merged (merged into the NF4 weights)
  peft+16bit    the common route: load the 16-bit base + PeftModel.from_pretrained(adapter)
                -> merge_and_unload() -> save_pretrained (merged into the original 16-bit weights)
  raw write     numpy writes the same number of bytes to the same disk (the bar to get close to)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(os.cpu_count())
args = json.loads(sys.argv[1])
work = args["work"]
if args["mode"] == "fastsave":
    from peft import PeftModel
    from fastsave.tiny import load_4bit
    import fastsave
    model = PeftModel.from_pretrained(load_4bit(work + "/base"), work + "/adapter")
    start = time.perf_counter()
    fastsave.save_pretrained_merged(model, work + "/out-fastsave", max_shard_size="5GB")
    print(json.dumps({"seconds": time.perf_counter() - start}))
elif args["mode"] == "peft":
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(work + "/base", dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, work + "/adapter").merge_and_unload()
    merged.save_pretrained(work + "/out-peft")
    print(json.dumps({"seconds": time.perf_counter() - start}))
else:
    import numpy as np
    data = np.random.default_rng(0).integers(0, 255, size=args["bytes"], dtype=np.uint8)
    start = time.perf_counter()
    with open(work + "/raw.bin", "wb") as handle:
        handle.write(memoryview(data))
        handle.flush()
        os.fsync(handle.fileno())
    print(json.dumps({"seconds": time.perf_counter() - start}))
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
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{mode} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
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
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="fastsave-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    nbytes = prepare(work, args.hidden, args.layers, args.vocab, args.rank)
    results = {
        "raw write": run_child("raw", str(work), nbytes),
        "fastsave": run_child("fastsave", str(work)),
        "peft+16bit": run_child("peft", str(work)),
    }
    raw = results["raw write"]["seconds"]
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.rank} on all linears; "
        f"output {nbytes / 1e6:.0f} MB bf16; {os.cpu_count()} CPU cores\n"
    )
    print("| contender | seconds | vs raw write | peak RSS (MiB) | throughput (MB/s) |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        seconds = result["seconds"]
        print(
            f"| {name} | {seconds:.2f} | {seconds / raw:.2f}x | {result['peak_rss_mib']:.0f} | {nbytes / 1e6 / seconds:.0f} |"
        )
    print(
        f"\nfastsave / peft+16bit time ratio: {results['fastsave']['seconds'] / results['peft+16bit']['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
