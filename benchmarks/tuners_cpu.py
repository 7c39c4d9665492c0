"""CPU benchmark: a merge of other peft tuners (LoHa, IA3) beside LoRA, on the same model.

    python benchmarks/tuners_cpu.py                 # 250m, fastest of 3 runs each
    python benchmarks/tuners_cpu.py --sizes 1b --repeat 1

The model is benchlib's Llama-3-proportioned random checkpoint (see save_cpu.py). Each case attaches
one tuner on every linear (LoRA r=16, LoHa r=16, IA3 with the MLP's down_proj as feed-forward) to
the base loaded in bf16 (LoHa: peft builds LyCORIS factors for the packed shape of a 4-bit
weight, so it runs on 16-bit bases only) or in NF4, moves every trained tensor off its initial
value, and times ``save_pretrained_merged`` (merged_16bit) alone, in a fresh process. Reported:
seconds, extra peak RSS (VmHWM over what the process held before the save, with the mapped base's
pages touched first so that they count as held) and that as a share of the output, beside the raw write of the same bytes (the floor, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, markdown_table, parse_sizes, prepare, proc_status, trim_and_reset_peak

CASES = [("LoRA", "bf16"), ("LoHa", "bf16"), ("IA3", "bf16"), ("LoRA", "nf4"), ("IA3", "nf4")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(tuner: str):
    import peft

    if tuner == "LoRA":
        return peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    if tuner == "LoHa":
        return peft.LoHaConfig(r=16, alpha=32, target_modules=TARGETS)
    return peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])


def one(tuner: str, base: str, work: Path, out: Path) -> dict:
    """One timed save in this process."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import fastsave
    from fastsave.tiny import load_4bit

    torch.set_num_threads(os.cpu_count() or 1)
    if base == "nf4":
        model = load_4bit(work / "base")
    else:
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    model = get_peft_model(model, _config(tuner))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    with torch.no_grad():  # a 16-bit base is memory-mapped: its pages count as held, not as the save's
        for tensor in model.state_dict().values():
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()
    held = trim_and_reset_peak()
    started = time.perf_counter()
    fastsave.save_pretrained_merged(model, out, save_method="merged_16bit")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "extra_peak": proc_status()["VmHWM"] - held["VmRSS"]}


def raw(nbytes: int, out: Path) -> dict:
    """The same bytes written from memory in 16 MiB writes, then fsync."""
    data = bytearray(b"\x5a") * nbytes
    started = time.perf_counter()
    with open(out, "wb") as handle:
        view = memoryview(data)
        for start in range(0, nbytes, 16 << 20):
            handle.write(view[start : start + (16 << 20)])
        handle.flush()
        os.fsync(handle.fileno())
    return {"seconds": time.perf_counter() - started, "extra_peak": 0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="250m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=None, help="where the base checkpoint is kept between runs")
    parser.add_argument("--one", nargs=4, metavar=("TUNER", "BASE", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        tuner, base, work, out = args.one
        print(json.dumps(one(tuner, base, Path(work), Path(out))))
        return
    print(machine())
    for label, size in parse_sizes(args.sizes).items():
        work = Path(args.work or Path(tempfile.gettempdir()) / "fastsave-bench") / label
        record = prepare(work, size)
        nbytes = record["output_bytes"]
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(dir=work) as scratch:
                results.setdefault("raw write", []).append(raw(nbytes, Path(scratch) / "raw.bin"))
            for tuner, base in CASES:
                with tempfile.TemporaryDirectory(dir=work) as scratch:
                    command = [
                        sys.executable,
                        __file__,
                        "--one",
                        tuner,
                        base,
                        str(work),
                        str(Path(scratch) / "out"),
                    ]
                    line = (
                        subprocess.run(command, check=True, capture_output=True, text=True)
                        .stdout.strip()
                        .splitlines()[-1]
                    )
                    results.setdefault(f"{tuner} on {base}", []).append(json.loads(line))
        floor = min(r["seconds"] for r in results["raw write"])
        rows = []
        for case, runs in results.items():
            fastest = min(r["seconds"] for r in runs)
            peak = max(r["extra_peak"] for r in runs)
            rows.append(
                [
                    case,
                    f"{fastest:.2f}",
                    f"{fastest / floor:.2f}",
                    f"{peak / 2**20:.0f}",
                    f"{100 * peak / nbytes:.0f}%",
                ]
            )
        print(f"\n{label}: {nbytes / 1e6:.0f} MB of bf16 output, fastest of {args.repeat}\n")
        print(markdown_table(["case", "seconds", "x raw write", "extra peak MiB", "of output"], rows))


if __name__ == "__main__":
    main()
