"""GPU benchmark: an 8B-shaped QLoRA model merged and saved end to end from CUDA, time split by stage.

    python benchmarks/save_gpu.py                      # Llama-3-8B shape, LoRA r=16 on all linears
    python benchmarks/save_gpu.py --size 1b --work /tmp/bench-gpu --json gpu.json

The model: a random Llama-3-8B-proportioned checkpoint (hidden 4096, 32 layers, MLP 14336, vocab
128256, untied lm_head; --size picks another of benchlib's sizes) written once in --work, loaded
with bitsandbytes NF4 (double quant, bf16 compute) onto the GPU, and a LoRA adapter (r=16, random
non-zero B) on every linear. Nothing is downloaded. Without a CUDA device the script says so and
exits 0: there is nothing to measure.

Stages, each timed alone in this process (CUDA synchronized around each):

  kernels    every planned tensor computed on the GPU (dequantize + merge, written in bf16 by the
             kernels, blocks sized by the VRAM budget) and dropped there: nothing crosses to the host
  + to host  the same with every block copied to pinned host memory (the producer as a save runs it,
             copies overlapping the next blocks' kernels), nothing written
  D2H floor  the output's bytes copied device -> pinned host in 16 MiB blocks, nothing computed
  disk floor the output's bytes written from memory + fsync
  save       fastsave.save_pretrained_merged(merged_16bit) end to end, to --work/out
  peft       the usual recipe on the same GPU (with --peft): load the 16-bit base onto the GPU, the
             adapter, merge_and_unload, save_pretrained, fsync (what a user runs without fastsave;
             its merge starts from the 16-bit base, not from the NF4 weights the model trained on)

Beside them: the peak VRAM the save added (torch.cuda.max_memory_allocated over what the model
held) against the VRAM budget (maximum_memory_usage x the free VRAM at the start), the extra peak
RssAnon of the process, and the saved weights checked against bitsandbytes' float32 dequantize +
peft's delta on the GPU (bf16 ulps: the fused kernel sums the rank in its own order, at most one
bf16 ulp apart; everything else bit-identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import SIZES, ModelSize, PeakSampler, markdown_table, mib, prepare, proc_status

GPU_SIZES = {**SIZES, "8b": ModelSize(hidden=4096, layers=32, vocab=128256)}
BLOCK = 16 << 20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8b", choices=sorted(GPU_SIZES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastsave-bench-gpu"))
    ap.add_argument("--fraction", type=float, default=0.75, help="maximum_memory_usage of the save")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--peft", action="store_true", help="also time the peft recipe on the GPU")
    return ap.parse_args(argv)


def _synchronized(job) -> tuple[float, Any]:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    value = job()
    torch.cuda.synchronize()
    return time.perf_counter() - started, value


def _produce_all(plan, to_host: bool) -> int:
    """Every planned tensor's pieces, dropped; blocks stay on the GPU unless ``to_host``."""
    from fastsave.merge import dispatch

    real = dispatch.to_host
    if not to_host:
        dispatch.to_host = lambda blocks, in_flight: iter(blocks)
    try:
        return sum(piece.numel() * piece.element_size() for item in plan.items for piece in item.pieces())
    finally:
        dispatch.to_host = real


def _d2h_floor(nbytes: int) -> None:
    import torch

    device = torch.empty(BLOCK, dtype=torch.uint8, device="cuda")
    hosts = [torch.empty(BLOCK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    for index in range(max(1, nbytes // BLOCK)):
        hosts[index % 2].copy_(device, non_blocking=True)
    torch.cuda.synchronize()


def _disk_floor(path: Path, nbytes: int) -> None:
    import numpy as np

    data = np.full(BLOCK * 4, 0x5A, dtype=np.uint8)
    with open(path, "wb") as handle:
        for start in range(0, nbytes, len(data)):
            handle.write(memoryview(data[: min(len(data), nbytes - start)]))
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()


def _peft_recipe(work: Path, out: Path) -> dict[str, float]:
    """Load the 16-bit base and the adapter onto the GPU, merge_and_unload, save_pretrained, fsync."""
    import shutil

    import torch
    from contenders import _fsync_tree
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16, device_map="cuda")
    merged = PeftModel.from_pretrained(base, str(work / "adapter")).merge_and_unload()
    torch.cuda.synchronize()
    loaded_merged = time.perf_counter() - started
    merged.save_pretrained(out)
    _fsync_tree(str(out))
    seconds = time.perf_counter() - started
    extra_vram = torch.cuda.max_memory_allocated() - held
    del merged, base
    torch.cuda.empty_cache()
    shutil.rmtree(out, ignore_errors=True)
    return {
        "peft_seconds": seconds,
        "peft_load_merge_seconds": loaded_merged,
        "peft_extra_vram_bytes": extra_vram,
    }


def _ulps(a, b) -> tuple[int, int]:
    """Max bf16 ulp distance between ``a`` and ``b`` and how many elements differ."""
    import torch

    def ordered(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        return torch.where(bits >= 0x8000, 0x8000 - bits, bits)

    distance = (ordered(a) - ordered(b)).abs()
    return int(distance.max()), int((distance != 0).sum())


def _check(model, out_dir: Path) -> dict[str, Any]:
    """The saved LoRA weights against bnb's float32 dequantize + peft's delta, on the GPU."""
    import copy

    import bitsandbytes.functional as bnb_functional
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    handles = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        handle = safe_open(str(file), framework="pt", device="cuda")
        handles.update({key: handle for key in handle.keys()})  # noqa: SIM118
    worst, differing, checked = 0, 0, 0
    for name, layer in model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.get_base_layer().weight
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32
        expected = bnb_functional.dequantize_4bit(weight.data, state)
        for adapter in layer.active_adapters:
            expected = expected + layer.get_delta_weight(adapter).to(torch.float32)
        key = f"{name}.weight"
        ulps, count = _ulps(handles[key].get_tensor(key), expected.to(torch.bfloat16))
        worst, differing, checked = max(worst, ulps), differing + count, checked + expected.numel()
    return {"max_ulp": worst, "differing": differing, "checked": checked}


def main(argv: list[str] | None = None) -> int:
    """Run the stages for one size and print the table; 0 without CUDA (nothing to measure)."""
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "save_gpu: no CUDA device here, nothing to measure (the CPU benchmarks: save_cpu.py, memory_cap.py)"
        )
        return 0
    from peft import PeftModel

    import fastsave
    from fastsave.inputs.live_model import LiveModelInput
    from fastsave.options import parse_options
    from fastsave.tiny import load_4bit
    from fastsave.vram import DeviceBudget

    size = GPU_SIZES[args.size]
    print(f"[{args.size}] preparing {size.describe()} in {args.work} ...", flush=True)
    started = time.perf_counter()
    record = prepare(args.work, size, args.rank)
    prepared = time.perf_counter()
    model = PeftModel.from_pretrained(
        load_4bit(args.work / "base", device_map="cuda"), str(args.work / "adapter")
    )
    model.eval()
    # where a large size's set-up goes (8B: minutes, before anything is measured)
    print(
        f"[{args.size}] checkpoint and adapter written in {prepared - started:.0f} s, "
        f"loaded in NF4 onto the GPU in {time.perf_counter() - prepared:.0f} s",
        flush=True,
    )
    nbytes = record["output_bytes"]
    plan = LiveModelInput(model).merged_plan(parse_options("unused-directory"))
    _produce_all(plan, to_host=False)  # warm-up: Triton compiles its kernels for these shapes once
    kernels_s, produced = _synchronized(lambda: _produce_all(plan, to_host=False))
    host_s, _ = _synchronized(lambda: _produce_all(plan, to_host=True))
    d2h_s, _ = _synchronized(lambda: _d2h_floor(nbytes))
    disk_s, _ = _synchronized(lambda: _disk_floor(args.work / "floor.bin", nbytes))

    out = args.work / "out"
    budget = DeviceBudget(args.fraction).allowance(torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    sampler = PeakSampler().start()
    anon = proc_status()["RssAnon"]
    sampler.reset()
    save_s, _ = _synchronized(
        lambda: fastsave.save_pretrained_merged(
            model, str(out), save_method="merged_16bit", maximum_memory_usage=args.fraction
        )
    )
    extra_anon = sampler.stop()["RssAnon"] - anon
    extra_vram = torch.cuda.max_memory_allocated() - held
    check = _check(model, out)

    gb = nbytes / 1e9
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name(),
        "output_bytes": nbytes,
        "produced_bytes": produced,
        "kernels_seconds": kernels_s,
        "to_host_seconds": host_s,
        "d2h_floor_seconds": d2h_s,
        "disk_floor_seconds": disk_s,
        "save_seconds": save_s,
        "extra_vram_bytes": extra_vram,
        "vram_budget_bytes": budget,
        "extra_rss_anon_bytes": extra_anon,
        **check,
    }
    rows = [
        ["kernels (dequantize + merge, on the GPU)", f"{kernels_s:.2f}", f"{gb / kernels_s:.1f}"],
        ["kernels + pinned copies to the host", f"{host_s:.2f}", f"{gb / host_s:.1f}"],
        ["D2H floor (pinned, 16 MiB blocks)", f"{d2h_s:.2f}", f"{gb / d2h_s:.1f}"],
        ["disk floor (write + fsync)", f"{disk_s:.2f}", f"{gb / disk_s:.1f}"],
        ["fastsave save, end to end", f"{save_s:.2f}", f"{gb / save_s:.1f}"],
    ]
    # printed (and written) before the peft recipe: at 8B the recipe alone takes minutes, and a run
    # stopped by its time limit must still leave fastsave's numbers behind
    print(f"\n{result['device']}, {size.describe()}, {gb:.2f} GB of bf16 output\n")
    print(markdown_table(["stage", "seconds", "GB/s"], rows))
    print(
        f"\nsave: {save_s / disk_s:.2f}x the disk floor; extra VRAM {mib(extra_vram)} MiB "
        f"(budget {mib(budget)} MiB); extra RssAnon {mib(extra_anon)} MiB; LoRA weights vs the float32 "
        f"reference: max {check['max_ulp']} bf16 ulp, {check['differing']} of {check['checked']} differ",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.peft:
        import shutil

        shutil.rmtree(out)  # room on the disk for the recipe's output
        peft = _peft_recipe(args.work, args.work / "peft-out")
        print(
            f"| peft recipe (load 16-bit, merge, save, fsync) | {peft['peft_seconds']:.2f} | "
            f"{gb / peft['peft_seconds']:.1f} |\n\npeft recipe: {peft['peft_seconds'] / save_s:.2f}x "
            f"fastsave's time ({peft['peft_load_merge_seconds']:.2f} s of it loading and merging), "
            f"extra VRAM {mib(peft['peft_extra_vram_bytes'])} MiB"
        )
        if args.json:
            args.json.write_text(json.dumps({**result, **peft}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
