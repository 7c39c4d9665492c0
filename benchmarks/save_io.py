"""What fastsave's save guarantees cost: the NaN/Inf check, the checksums, O_DIRECT, the atomic switch.

    python benchmarks/save_io.py [--hidden 1024 --layers 12 --repeat 3 --dir DIR]

Builds a random Llama-shaped base (as benchmarks/save_cpu.py does; nothing is downloaded), loads
it in 4-bit with a LoRA adapter once, then saves it merged (bf16) again and again in one process,
the variants interleaved so that a slow spell of the disk hits all of them; each variant's fastest
run counts:

  full             what a save does: NaN/Inf check, CRC-32s on the I/O thread, O_DIRECT writes
                   (where the filesystem suits), atomic publish
  no-checksum      the CRC-32s switched off
  sha256           a sha256 of the data on the I/O thread instead (what fastsave recorded before)
  page-cache       FASTSAVE_O_DIRECT=0: the same writes through the page cache
  no-finite-check  the NaN/Inf check switched off
  re-save          full, over the previous checkpoint with 200 user files beside it (hard-linked
                   into staging, then the directories exchanged)

It also measures the NaN/Inf check (torch.aminmax), CRC-32 and sha256 alone, per GB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401  (importing it puts this process and the ones it starts offline)


def _micro(threads: int) -> dict[str, float]:
    import torch

    from fastsave.io.checksums import BlockCrc32
    from fastsave.io.finite import check_finite

    torch.set_num_threads(threads)
    result = {}
    for dtype in (torch.bfloat16, torch.float16):
        tensor = torch.randn(128 * 2**20).to(dtype)  # 256 MiB
        best = min(_timed(lambda t=tensor: check_finite(t, "x")) for _ in range(5))
        result[f"finite check {str(dtype).removeprefix('torch.')}, {threads} thread(s)"] = best / (
            tensor.numel() * 2 / 1e9
        )
    data = memoryview(os.urandom(256 * 2**20))
    best = min(_timed(lambda: hashlib.sha256(data).digest()) for _ in range(3))
    result["sha256, 1 thread"] = best / (len(data) / 1e9)
    best = min(_timed(lambda: BlockCrc32().update(data)) for _ in range(3))
    result["CRC-32 (fastsave's: ISA-L, else zlib), 1 thread"] = best / (len(data) / 1e9)
    return result


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--variants", default="full,no-checksum,sha256,page-cache,no-finite-check,re-save")
    parser.add_argument("--no-micro", action="store_true", help="skip the per-GB measurements")
    args = parser.parse_args()
    import torch

    import fastsave
    from fastsave.io import finite, shards
    from fastsave.io.checksums import BlockCrc32
    from fastsave.pipeline import producer
    from fastsave.tiny import attach_lora, load_4bit, save_random_model, tiny_llama_config

    work = Path(args.dir or tempfile.mkdtemp(prefix="fastsave-io-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 3.5) // 256 * 256,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
    )
    if not (work / "base" / "config.json").exists():
        save_random_model(config, work / "base")
    model = attach_lora(load_4bit(work / "base"), r=16, alpha=32)
    torch.set_num_threads(os.cpu_count())

    class NoChecksum(BlockCrc32):
        def update(self, data):
            pass

    class Sha256(BlockCrc32):  # what the I/O thread would spend on a sha256 of the same bytes
        def __init__(self, block: int = 0) -> None:
            super().__init__()
            self._sha = hashlib.sha256()

        def update(self, data):
            self._sha.update(data)

    real_check = finite.check_finite

    def configure(variant: str) -> None:
        shards.BlockCrc32 = {"no-checksum": NoChecksum, "sha256": Sha256}.get(variant, BlockCrc32)
        producer.check_finite = (lambda tensor, name: None) if variant == "no-finite-check" else real_check
        if variant == "page-cache":
            os.environ["FASTSAVE_O_DIRECT"] = "0"
        else:
            os.environ.pop("FASTSAVE_O_DIRECT", None)

    variants = args.variants.split(",")
    best: dict[str, float] = {}
    nbytes = 0
    for _ in range(max(1, args.repeat)):
        for variant in variants:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            if variant == "re-save":
                configure("full")
                fastsave.save_pretrained_merged(model, out)
                for i in range(200):
                    (out / f"note-{i}.txt").write_text("user file")
            configure(variant)
            seconds = _timed(lambda out=out: fastsave.save_pretrained_merged(model, out))
            best[variant] = min(best.get(variant, seconds), seconds)
            nbytes = (out / "model.safetensors").stat().st_size
    configure("full")
    print(f"\n{nbytes / 1e6:.0f} MB bf16 checkpoint, {os.cpu_count()} CPU cores, fastest of {args.repeat}\n")
    print("| variant | seconds | vs full |")
    print("|---|---|---|")
    for variant in variants:
        print(f"| {variant} | {best[variant]:.2f} | {best[variant] / best.get('full', best[variant]):.3f}x |")
    if args.no_micro:
        return
    print("\n| alone | ms per GB |")
    print("|---|---|")
    for threads in sorted({1, os.cpu_count() or 1}):
        for name, seconds in _micro(threads).items():
            if ("sha256" in name or "CRC" in name) and threads > 1:
                continue
            print(f"| {name} | {seconds * 1000:.0f} |")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
