"""The contenders of the CPU benchmarks, each run alone in a fresh process by benchlib.run_contender.

    python benchmarks/contenders.py NAME '{"work": DIR, ...}'

A contender is a setup (not timed: load what the process holds before the work starts) and a job
(timed). The driver here does the same around every job: free what loading left unused, reset
the peak-RSS mark, start a thread sampling RssAnon/VmData, optionally cap the process's data
segment (``"cap": {"headroom_bytes": N}``: RLIMIT_DATA = VmData now + N), time the job, lift
the cap, optionally check the output against an independent reference (``"verify": true``), and
print one result line. Failures in the job are results too (``outcome: "failed"``), so that a
save refused by the cap is reported, not a crash.

Params every contender reads: ``work`` (the prepared directory: base/, adapter/), ``out`` (the
output path, removed by the caller). ``sample_ms``: the sampling interval (default 2; 0: off).
``paired_floor``: after a job that succeeded (its time and memory taken), write ``output_bytes``
bytes from memory to a file beside ``out`` the floor's fastest way (the faster of O_DIRECT in 16 MiB
writes and in one write, else 16 MiB writes)
and report the seconds as ``paired_floor_seconds``: the disk's speed in the same process, right
after the job, so that a ratio of the two does not depend on how fast the disk happened to be in
another process minutes before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    OUT_OF_MEMORY_MESSAGES,
    PeakSampler,
    cpu_busy_seconds,
    emit_result,
    proc_status,
    trim_and_reset_peak,
)

# ---------------------------------------------------------------------------- the registry


@dataclass
class Contender:
    """setup(params) -> state (not timed); job(state, params) -> extra result fields (timed)."""

    setup: Callable[[dict], Any]
    job: Callable[[Any, dict], dict | None]


CONTENDERS: dict[str, Contender] = {}


def contender(name: str, setup: Callable[[dict], Any]) -> Callable:
    """Register ``job`` under ``name`` with its ``setup``."""

    def register(job: Callable[[Any, dict], dict | None]) -> Callable:
        CONTENDERS[name] = Contender(setup, job)
        return job

    return register


# ---------------------------------------------------------------------------- setups


def _imports_only(params: dict) -> dict:
    # Import what the jobs import (peft alone takes seconds), so that the timed part is the work.
    # The model class too: transformers imports its modeling modules lazily.
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import fastsave.cli
    import fastsave.cli.merge  # noqa: F401 - fastsave.cli imports it only when it parses arguments

    return {}


def _imports_and_cached_base(params: dict) -> dict:
    """:func:`_imports_only`, then every file of the 16-bit base read once, so that each contender
    that reads it (peft, cli, cli-original) finds it in the page cache. Without this the order
    decided: at 3B the raw contender's buffered writes (three times the output) pushed part of the
    base out of the cache, so the contender after it read from the disk and the next one did not."""
    state = _imports_only(params)
    for file in sorted((Path(params["work"]) / "base").iterdir()):
        with open(file, "rb", buffering=0) as handle:
            while handle.read(16 << 20):
                pass
    return state


def load_trained_model(params: dict) -> dict:
    """The trained QLoRA model a user holds after training: the 16-bit base quantized to NF4 while
    loading (bitsandbytes, on the CPU: ~10 M parameters/s, minutes at 3B) + the adapter (peft)."""
    from peft import PeftModel

    from fastsave.tiny import load_4bit

    work = Path(params["work"])
    model = PeftModel.from_pretrained(load_4bit(work / "base"), str(work / "adapter"))
    model.eval()
    return {"model": model}


def load_prequantized_model(params: dict) -> dict:
    """The same 4-bit model from the pre-quantized copy benchlib.prepare wrote (same codes and
    quant_state, loaded in seconds), for the compute-only contenders.

    Not for the timed saves, although fastsave saves such a model (tests/test_core_merged.py): its
    codes stay in the memory-mapped file, so what it holds, and what a save reads, differs from a
    model quantized while loading, which is what a user holds after training.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = Path(params["work"])
    base = AutoModelForCausalLM.from_pretrained(work / "base-4bit", device_map="cpu", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(work / "adapter"))
    model.eval()
    return {"model": model}


def raw_setup(params: dict) -> dict:
    """``params["output_bytes"]`` bytes of memory the floor writes from: ``data`` (numpy, filled)
    over ``buffer`` (its mapping, to close once written)."""
    import mmap

    import numpy as np

    size = int(params["output_bytes"])
    # page-aligned, so that O_DIRECT can write from it; private and in transparent huge pages where
    # the kernel gives them: the device then reads physically contiguous memory, in fewer and larger
    # segments (a shared mapping's pages took 1 GiB O_DIRECT 1.13x as long here), as fastsave's
    # own buffers are: the floor is the fastest way
    buffer = mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
    data = np.frombuffer(buffer, dtype=np.uint8, count=size)
    data[:] = 0x5A
    return {"data": data, "buffer": buffer}


# ---------------------------------------------------------------------------- jobs

_CHUNK = 16 << 20


def _write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    while len(view):
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _sequential(data, path: str, chunk: int | None = _CHUNK) -> None:
    """The bytes in write calls of ``chunk`` bytes (None: one call), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        step = chunk or max(1, len(view))
        for start in range(0, len(view), step):
            _write_all(fd, view[start : start + step])
        os.fsync(fd)
    finally:
        os.close(fd)


def _threads(data, path: str) -> None:
    import threading

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        count = max(2, len(os.sched_getaffinity(0)))
        share = -(-len(view) // count)
        share += -share % _CHUNK

        def part(begin: int) -> None:
            for start in range(begin, min(len(view), begin + share), _CHUNK):
                _write_all(fd, view[start : min(start + _CHUNK, begin + share, len(view))], start)

        workers = [threading.Thread(target=part, args=(i * share,)) for i in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        os.fsync(fd)
    finally:
        os.close(fd)


def _direct(data, path: str, chunk: int | None = _CHUNK) -> None:
    """O_DIRECT for the 4096-aligned part (the page cache bypassed) in write calls of ``chunk`` bytes
    (None: one call, or as few as the kernel takes: Linux writes at most 2 GiB - 4 KiB a call), the
    tail written normally."""
    view = memoryview(data)
    aligned = len(view) - len(view) % 4096
    step = chunk or max(1, aligned)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for start in range(0, aligned, step):
            _write_all(fd, view[start : min(start + step, aligned)])
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_all(fd, view[aligned:], aligned)
        os.fsync(fd)
    finally:
        os.close(fd)


RAW_WAYS = {
    "one write": lambda data, path: _sequential(data, path, chunk=None),
    "16 MiB writes": _sequential,
    "threads": _threads,
    "O_DIRECT": _direct,
    # larger O_DIRECT writes are faster still: 513 MiB on this project's 2-core Intel machine, 12
    # rounds alternating, 0.166-0.169 s (fastest three) in one call against 0.188-0.190 s in 16 MiB
    # calls, 64 MiB calls 0.173-0.177 s
    "O_DIRECT one write": lambda data, path: _direct(data, path, chunk=None),
}
DIRECT_WAYS = ("O_DIRECT", "O_DIRECT one write")


def _timed_way(way: str, data, path: str) -> float:
    """Seconds the raw way ``way`` takes to write ``data`` to ``path``, fsync included; the file is
    removed after (also when the way raises OSError: O_DIRECT on a filesystem that refuses it)."""
    started = time.perf_counter()
    try:
        RAW_WAYS[way](data, path)
        return time.perf_counter() - started
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def fastest_direct(data, path: str) -> float:
    """Seconds of the faster of the O_DIRECT ways (:data:`DIRECT_WAYS`, each timed once) to write
    ``data`` to ``path``; raises OSError where O_DIRECT is refused."""
    return min(_timed_way(way, data, path) for way in DIRECT_WAYS)


@contender("raw", raw_setup)
def raw_write(state: dict, params: dict) -> dict:
    """The floor: the fastest of several ways to put the checkpoint's number of bytes from memory on
    the same disk, each followed by fsync (one write call, 16 MiB writes, a thread per core writing
    its part, O_DIRECT in 16 MiB writes and in one write where the filesystem allows it).
    ``floor_seconds`` is the fastest."""
    data = state["data"]
    seconds: dict[str, float] = {}
    for way in RAW_WAYS:
        try:
            seconds[way] = _timed_way(way, data, f"{params['out']}.{way.replace(' ', '-')}")
        except OSError as error:  # O_DIRECT on a filesystem that refuses it
            seconds[way] = float("nan")
            print(f"raw write, {way}: not possible here ({error})", file=sys.stderr)
    done = {way: s for way, s in seconds.items() if s == s}
    fastest = min(done, key=done.get)
    return {"bytes": len(data), "floor_seconds": done[fastest], "floor_way": fastest, "ways": seconds}


def paired_floor(params: dict) -> float:
    """Seconds to write ``params["output_bytes"]`` bytes from memory beside ``params["out"]`` the
    floor's way (the faster of the O_DIRECT ways, or 16 MiB writes where the filesystem refuses
    O_DIRECT), fsync included; the file is removed after. Run after a job, outside its timed part
    and its memory peak."""
    state = raw_setup(params)
    path = f"{params['out']}.paired-floor"
    try:
        try:
            return fastest_direct(state["data"], path)
        except OSError:  # O_DIRECT refused: the page cache's fastest way
            started = time.perf_counter()
            _sequential(state["data"], path)
            return time.perf_counter() - started
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        del state["data"]
        state["buffer"].close()


def load_trained_model_and_fastsave(params: dict) -> dict:
    """:func:`load_trained_model`, with fastsave's save modules imported (``fastsave`` imports
    them on first use: about 0.05 s here), as the recipe's peft and transformers are imported by
    the loading: the clock times the save, not an import."""
    import fastsave.api  # noqa: F401

    return load_trained_model(params)


@contender("fastsave", load_trained_model_and_fastsave)
def fastsave_save(state: dict, params: dict) -> dict:
    """fastsave's merged_16bit save of the 4-bit peft model held in memory (default options)."""
    import fastsave

    fastsave.save_pretrained_merged(state["model"], params["out"], save_method="merged_16bit")
    return {}


@contender("fastsave-whole-products", load_trained_model_and_fastsave)
def fastsave_save_whole_products(state: dict, params: dict) -> dict:
    """fastsave's save as if the BLAS never gave a block of a LoRA product the whole product's bits:
    every product check fails and the one pass may not compute the product itself, so each LoRA
    weight merges by rows read from its whole product (fastsave.merge.row_blocks.product_blocks),
    the path a shape takes whose check fails (once seen under RLIMIT_DATA). A measurement of that
    path's memory and time, not a way to save."""
    import fastsave
    from fastsave.merge import fused_rows, row_blocks

    row_blocks.blockwise_product_is_exact = lambda *args, **kwargs: False
    fused_rows.inline_product_is_exact = lambda b, a: False
    fastsave.save_pretrained_merged(state["model"], params["out"], save_method="merged_16bit")
    return {}


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contender("peft", _imports_and_cached_base)
def peft_recipe(state: dict, params: dict) -> dict:
    """The usual route: load the 16-bit base + the adapter, merge_and_unload, save_pretrained.

    save_pretrained does not fsync; the job does, so that every contender's time ends with the
    bytes on disk. ``seconds_before_fsync`` is the time save_pretrained returned.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    work = Path(params["work"])
    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(work / "adapter")).merge_and_unload()
    merged.save_pretrained(params["out"])
    before_fsync = time.perf_counter() - started
    _fsync_tree(params["out"])
    return {"seconds_before_fsync": before_fsync}


def _run_merge_command(params: dict, *flags: str) -> dict:
    from fastsave.cli import main

    code = main(["merge", str(Path(params["work"]) / "adapter"), params["out"], *flags])
    if code != 0:
        raise RuntimeError(f"fastsave merge exited with status {code}")
    return {}


@contender("cli", _imports_and_cached_base)
def cli_merge(state: dict, params: dict) -> dict:
    """``fastsave merge ADAPTER OUT``: the console script's own main() on the saved adapter.

    The base is found from the adapter's base_model_name_or_path (the prepared base directory).
    """
    return _run_merge_command(params)


@contender("cli-original", _imports_and_cached_base)
def cli_merge_original(state: dict, params: dict) -> dict:
    """``fastsave merge ADAPTER OUT --base-weights original``: no 4-bit round trip of the base."""
    return _run_merge_command(params, "--base-weights", "original")


def lora_layers(model: Any) -> list:
    """The peft LoRA layers of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contender("loop", load_prequantized_model)
def plain_merge_loop(state: dict, params: dict) -> dict:
    """The merge compute rate of the hardware: per LoRA-wrapped 4-bit linear, bitsandbytes' float32
    dequantize, one addmm of the LoRA delta, a cast to bf16; nothing written, nothing checked."""
    import copy

    import bitsandbytes.functional as bnb_functional
    import torch

    count = 0
    for layer in lora_layers(state["model"]):
        weight = layer.get_base_layer().weight
        if not hasattr(weight, "quant_state"):  # a 16-bit LoRA base (lm_head): not a 4-bit merge
            continue
        quant_state = copy.copy(weight.quant_state)
        quant_state.dtype = torch.float32
        merged = bnb_functional.dequantize_4bit(weight.data, quant_state)
        for adapter in layer.active_adapters:
            merged.addmm_(
                layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, alpha=layer.scaling[adapter]
            )
        merged.to(torch.bfloat16)
        count += merged.numel()
    return {"merged_parameters": count}


def merged_plan(model: Any) -> Any:
    """fastsave's plan of a merged_16bit save of ``model``: every output tensor with its pieces
    (dequantize + delta + one rounding, streamed in row blocks on CPU), to drive the producer
    without the writer. The one place to adapt when the plan's interface changes."""
    from fastsave.inputs.live_model import LiveModelInput
    from fastsave.options import parse_options

    return LiveModelInput(model).merged_plan(parse_options("unused-directory"))


def _fastsave_plan(params: dict) -> dict:
    state = load_prequantized_model(params)
    started = time.perf_counter()
    state["plan"] = merged_plan(state["model"])
    state["plan_seconds"] = time.perf_counter() - started
    return state


@contender("producer", _fastsave_plan)
def fastsave_producer(state: dict, params: dict) -> dict:
    """fastsave's producer without the writer: every planned tensor produced in plan order, in
    this thread, and dropped. The LoRA weights' time gives the merge rate beside the plain loop."""
    merged_seconds = other_seconds = 0.0
    count = 0
    for planned in state["plan"].items:
        started = time.perf_counter()
        produced = sum(piece.numel() for piece in planned.pieces())
        took = time.perf_counter() - started
        if planned.lora_module is not None:
            merged_seconds += took
            count += produced
        else:
            other_seconds += took
    return {
        "merged_parameters": count,
        "merged_seconds": merged_seconds,
        "other_seconds": other_seconds,
        "plan_seconds": state["plan_seconds"],
    }


# ---------------------------------------------------------------------------- checking the output


def reference_weight(layer: Any, dtype: Any) -> Any:
    """W = bitsandbytes' float32 dequantize (a copied quant_state; a 16-bit weight: as it is) +
    peft's deltas, rounded once."""
    import copy

    import bitsandbytes.functional as bnb_functional
    import torch

    weight = layer.get_base_layer().weight
    if hasattr(weight, "quant_state"):
        quant_state = copy.copy(weight.quant_state)
        quant_state.dtype = torch.float32  # dtype=bf16 would round before the delta is added
        merged = bnb_functional.dequantize_4bit(weight.data, quant_state)
    else:
        merged = weight.detach().to(torch.float32)
    for adapter in layer.active_adapters:
        merged = merged + layer.get_delta_weight(adapter).to(torch.float32)
    return merged.to(dtype)


def verify_merged(model: Any, out_dir: str, base_dir: str) -> dict:
    """Compare a merged checkpoint, tensor by tensor, with references built without fastsave.

    LoRA-wrapped weights: :func:`reference_weight`. Every other tensor: the base checkpoint's own
    (a 4-bit load keeps embeddings, norms and lm_head in 16-bit as they are). The names must be
    the base checkpoint's names.
    """
    import torch
    from safetensors import safe_open

    def tensors_of(directory: str) -> dict:
        handles = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            handles.update({key: handle for key in handle.keys()})  # noqa: SIM118
        return handles

    out, base = tensors_of(out_dir), tensors_of(base_dir)
    root = model.get_base_model()
    wrapped = set(lora_layers(model))
    layers = {f"{name}.weight": m for name, m in root.named_modules() if m in wrapped}
    differing = []
    for name in sorted(set(out) & set(base)):
        got = out[name].get_tensor(name)
        if name in layers:
            expected = reference_weight(layers[name], torch.bfloat16)
        else:
            expected = base[name].get_tensor(name)
        if got.dtype != expected.dtype or not torch.equal(got, expected):
            differing.append(name)
    names_equal = set(out) == set(base)
    return {
        "exact": names_equal and not differing,
        "names_equal": names_equal,
        "differing": differing[:8],
        "tensors": len(out),
        "merged_checked": len(set(layers) & set(out)),
    }


# ---------------------------------------------------------------------------- the driver


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) says an allocation was refused."""
    while error is not None:
        if isinstance(error, MemoryError):
            return True
        if isinstance(error, OSError) and error.errno == errno.ENOMEM:
            return True
        if any(text.lower() in str(error).lower() for text in OUT_OF_MEMORY_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def run(name: str, params: dict) -> dict:
    """Set up, measure and run contender ``name``; the result (see the module docstring)."""
    import torch

    # every core unless "threads" says otherwise (the memory-cap test pins 2: each OpenMP worker a
    # new thread starts costs a thread stack of VmData, so the result would depend on the machine)
    torch.set_num_threads(int(params.get("threads") or len(os.sched_getaffinity(0))))
    chosen = CONTENDERS[name]
    result: dict[str, Any] = {"name": name}
    started = time.perf_counter()
    state = chosen.setup(params)
    result["setup_seconds"] = time.perf_counter() - started
    sampler = PeakSampler(params.get("sample_ms", 2) / 1000) if params.get("sample_ms", 2) else None
    if sampler:
        sampler.start()
    held = trim_and_reset_peak()
    result["held"] = held
    if sampler:
        sampler.reset()
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if params.get("cap"):
        limit = held["VmData"] + int(params["cap"]["headroom_bytes"])
        result["cap_bytes"] = limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    # what is known so far, in case the job kills the process (libgomp exits when it cannot start
    # a thread): run_contender then reports "crashed" with these fields
    emit_result({**result, "outcome": "running"})
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    machine_before = cpu_busy_seconds()
    started = time.perf_counter()
    try:
        result.update(chosen.job(state, params) or {})
        result["outcome"] = "ok"
    except Exception as error:
        result["outcome"] = "failed"
        result["error_type"] = type(error).__name__
        result["error"] = str(error)[:800]
        result["out_of_memory"] = is_out_of_memory(error)
        result["traceback"] = traceback.format_exc()[-3000:]
    result["seconds"] = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    # the share of the machine's CPUs that other processes used meanwhile: timings are noisy then
    others = max(0.0, cpu_busy_seconds() - machine_before - result["cpu_seconds"])
    result["others_cpu_share"] = others / max(1e-9, result["seconds"] * len(os.sched_getaffinity(0)))
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    after = proc_status()
    result["peak"] = {"VmHWM": after["VmHWM"]}
    if sampler:
        result["peak"].update(sampler.stop())
    result["extra"] = {
        "VmHWM": after["VmHWM"] - held["VmRSS"],
        **({key: result["peak"][key] - held[key] for key in ("RssAnon", "VmData")} if sampler else {}),
    }
    if params.get("paired_floor") and result["outcome"] == "ok":
        result["paired_floor_seconds"] = paired_floor(params)
    if params.get("verify") and result["outcome"] == "ok":
        result["verify"] = verify_merged(state["model"], params["out"], str(Path(params["work"]) / "base"))
    return result


def main() -> None:
    """``contenders.py NAME JSON_PARAMS``: run one contender and print its result line."""
    name, params = sys.argv[1], json.loads(sys.argv[2])
    emit_result(run(name, params))


if __name__ == "__main__":
    main()
