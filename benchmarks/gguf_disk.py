"""GGUF export: the old route (a temporary 16-bit checkpoint) against the new one (llama.cpp's
converter fed straight from the merge), side by side: peak disk, wall time, peak extra RSS.

    python benchmarks/gguf_disk.py --llama-cpp PATH/TO/llama.cpp              # 250m, q8_0
    python benchmarks/gguf_disk.py --sizes 1b --methods q8_0,f16 --llama-cpp ...

The model is benchlib's random Llama-3-proportioned checkpoint with LoRA r=16 on every linear,
loaded in NF4 as after QLoRA training, with a small sentencepiece tokenizer (llama.cpp pads the
vocabulary to the model's). Each route runs in a fresh process; a thread samples the disk's used
bytes every 20 ms (peak over the start), VmHWM gives the peak RSS over what the process held.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import machine, markdown_table, parse_sizes, prepare, proc_status, trim_and_reset_peak


def one(route: str, method: str, work: Path, out: Path, llama_cpp: str) -> dict:
    """One export in this process."""
    import torch
    from peft import PeftModel

    import fastsave
    from fastsave.export import feed
    from fastsave.tiny import build_sentencepiece_tokenizer, load_4bit

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer_dir = work / "spm-tokenizer"
    if not (tokenizer_dir / "tokenizer.model").is_file():
        build_sentencepiece_tokenizer(tokenizer_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = PeftModel.from_pretrained(load_4bit(work / "base"), str(work / "adapter"))
    if route == "checkpoint":

        def unavailable(tools):
            raise feed.FeedUnavailable("the old route, asked for by the benchmark")

        feed._converter = unavailable
    held = trim_and_reset_peak()
    used_before = shutil.disk_usage(out.parent).used
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shutil.disk_usage(out.parent).used - used_before)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    paths = fastsave.save_pretrained_gguf(model, out, tokenizer, method, llama_cpp=llama_cpp)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    size = sum(Path(p).stat().st_size for p in paths)
    return {
        "seconds": seconds,
        "peak_disk": peak[0],
        "gguf": size,
        "extra_peak": proc_status()["VmHWM"] - held["VmRSS"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="250m")
    parser.add_argument("--methods", default="q8_0")
    parser.add_argument("--llama-cpp", default=os.environ.get("FASTSAVE_LLAMA_CPP", "llama.cpp"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--one", nargs=4, metavar=("ROUTE", "METHOD", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        route, method, work, out = args.one
        print(json.dumps(one(route, method, Path(work), Path(out), args.llama_cpp)))
        return
    print(machine())
    for label, size in parse_sizes(args.sizes).items():
        work = Path(args.work or Path(tempfile.gettempdir()) / "fastsave-bench") / label
        record = prepare(work, size)
        rows = []
        for method in args.methods.split(","):
            for route in ("checkpoint", "fed"):
                with tempfile.TemporaryDirectory(dir=work) as scratch:
                    command = [
                        sys.executable,
                        __file__,
                        "--llama-cpp",
                        args.llama_cpp,
                        "--one",
                        route,
                        method,
                        str(work),
                        str(Path(scratch) / "out"),
                    ]
                    result = subprocess.run(command, check=True, capture_output=True, text=True)
                    r = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(
                    [
                        f"{method}, {'temporary 16-bit checkpoint' if route == 'checkpoint' else 'fed from the merge'}",
                        f"{r['seconds']:.1f}",
                        f"{r['peak_disk'] / 1e6:.0f}",
                        f"{r['gguf'] / 1e6:.0f}",
                        f"{r['extra_peak'] / 2**20:.0f}",
                    ]
                )
        print(f"\n{label}: {record['output_bytes'] / 1e6:.0f} MB of bf16 weights\n")
        print(markdown_table(["route", "seconds", "peak disk MB", "GGUF MB", "extra peak RSS MiB"], rows))


if __name__ == "__main__":
    main()
