"""Shared code of the CPU benchmarks (save_cpu.py, memory_cap.py, plan_scaling.py).

What lives here: the model sizes, writing a random base checkpoint and a trained-looking adapter
for one size, reading this process's memory counters from /proc/self/status, and running one
contender of benchmarks/contenders.py in a fresh process. Importing this module imports nothing
heavy (no torch): the parent scripts stay small and every contender measures its own process.

Memory words used by every script (Linux /proc/self/status):

* VmHWM: the peak resident set size, page cache of mapped files included. "extra" = the peak
  after the mark was reset (clear_refs 5) minus VmRSS at the reset.
* RssAnon: resident anonymous memory only (what cannot be reclaimed without swap). Sampled by a
  thread, since the kernel keeps no peak of it.
* VmData: private writable virtual memory, resident or not. This is what RLIMIT_DATA limits, and
  it includes a file that safetensors memory-maps (safetensors 0.8 maps it private and writable),
  though the pages of that file are clean page cache that the kernel can drop at any time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTENDERS_SCRIPT = HERE / "contenders.py"
RESULT_MARK = "FASTSAVE-BENCH-RESULT "
MiB = 1 << 20
# No benchmark reaches a hub. Besides models, bitsandbytes' CPU backend asks the hub for a kernel
# when it is imported (on a CPU with AVX-512 BF16, where the Hugging Face `kernels` package is
# installed: transformers 5.25 installs it); offline, it falls back to its own.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def stay_offline() -> None:
    """Put this process, and every process it starts, in the hubs' offline mode (unless the
    caller's environment already says otherwise)."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)


stay_offline()  # every script that imports this module, before it imports any library


# --------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ModelSize:
    """A decoder's shape: Llama-3-proportioned unless told (head_dim 128, 4 query heads per KV head,
    MLP 3.5x hidden); ``arch="qwen2"`` adds Qwen2's biases on q, k and v."""

    hidden: int
    layers: int
    vocab: int = 32000
    tie: bool = False
    lora_lm_head: bool = False  # LoRA on lm_head too (a 16-bit linear: a 4-bit load keeps it 16-bit)
    arch: str = "llama"  # "llama" or "qwen2"
    head_dim: int = 128
    kv_groups: int = 4  # query heads per KV head
    mlp: int = 0  # the MLP's width; 0: Llama-3's ratio

    @property
    def intermediate(self) -> int:
        """The MLP's width: ``mlp``, else Llama-3's ratio (4096 -> 14336), rounded down to a multiple of 256."""
        return self.mlp or int(self.hidden * 3.5) // 256 * 256

    @property
    def heads(self) -> int:
        """Query heads."""
        return max(1, self.hidden // self.head_dim)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: a ``kv_groups``-th of the query heads (a quarter, as in Llama-3)."""
        return max(1, self.heads // self.kv_groups)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every linear layer in one decoder layer (all LoRA targets)."""
        h, kv, m = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]

    @property
    def linear_parameters(self) -> int:
        """Parameters in the decoder layers' linears: what the LoRA merge computes."""
        return self.layers * sum(o * i for o, i in self.linear_shapes())

    @property
    def parameters(self) -> int:
        """All parameters of the checkpoint (embeddings, lm_head unless tied, norms, Qwen2's biases)."""
        embeddings = self.vocab * self.hidden * (1 if self.tie else 2)
        norms = (2 * self.layers + 1) * self.hidden
        biases = self.layers * sum(o for o, _ in self.linear_shapes()[:3]) if self.arch == "qwen2" else 0
        return self.linear_parameters + embeddings + norms + biases

    def config(self) -> Any:
        """The transformers config of this shape."""
        shape = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tie,
        )
        if self.arch == "qwen2":
            from transformers import Qwen2Config

            return Qwen2Config(**shape, max_position_embeddings=2048)
        from fastsave.tiny import tiny_llama_config

        return tiny_llama_config(**shape, head_dim=self.head_dim)

    def describe(self) -> str:
        """One line for a table caption."""
        return (
            f"{'Qwen2, ' if self.arch == 'qwen2' else ''}"
            f"hidden {self.hidden}, {self.layers} layers, MLP {self.intermediate}, vocab {self.vocab}"
            f"{', tied embeddings' if self.tie else ''}{', LoRA on lm_head too' if self.lora_lm_head else ''}: "
            f"{self.parameters / 1e9:.2f} B parameters"
        )


SIZES: dict[str, ModelSize] = {
    # tests/test_memory_cap.py: 176 MB of bf16 output, so that a quarter of it (44 MB) is more than
    # the fixed cost of a save's threads (8 MiB of VmData per thread stack). LoRA on lm_head too: its
    # merge (19% of the output in bf16) is the one tensor whose working set decides the peak, so
    # whether a save fits does not hang on thread timing (how far the producer runs ahead).
    "test": ModelSize(hidden=1024, layers=4, vocab=16384, lora_lm_head=True),
    "250m": ModelSize(hidden=1024, layers=14),
    "1b": ModelSize(hidden=2048, layers=16),
    "3b": ModelSize(hidden=3072, layers=24),
    # Qwen2.5-0.5B's shape (its biases leave the merged weights off the 4 KiB blocks)
    "qwen0.5b": ModelSize(
        hidden=896, layers=24, vocab=151936, tie=True, arch="qwen2", head_dim=64, kv_groups=7, mlp=4864
    ),
}


def parse_sizes(text: str) -> dict[str, ModelSize]:
    """``"250m,1b"`` or ``"2048x16"`` (hidden x layers) -> {name: ModelSize}."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item in SIZES:
            sizes[item] = SIZES[item]
        elif "x" in item:
            hidden, layers = (int(v) for v in item.split("x"))
            sizes[item] = ModelSize(hidden, layers)
        else:
            raise SystemExit(f"unknown size {item!r}: one of {', '.join(SIZES)} or HIDDENxLAYERS")
    return sizes


# --------------------------------------------------------------------------- preparing a model


def prepare(work: Path, size: ModelSize, rank: int = 16, prequantized: bool = False) -> dict[str, Any]:
    """Write ``work/base`` (random bf16 checkpoint) and ``work/adapter`` (LoRA r on all linears);
    with ``prequantized`` also ``work/base-4bit`` (the base quantized to NF4 and saved).

    The adapter's B is random (non-zero), so the merge has a delta to add. A directory prepared
    before with the same size and rank is reused (``work/prepared.json`` records them). Returns
    that record: output bytes (bf16), parameters, LoRA-wrapped parameters.
    """
    record_path = work / "prepared.json"
    wanted = {"size": asdict(size), "rank": rank}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        try:  # a record written before ModelSize had its later fields holds their defaults
            recorded = {"size": asdict(ModelSize(**record.get("size", {}))), "rank": record.get("rank")}
        except TypeError:
            recorded = {}
        if recorded == wanted:
            if prequantized and not (work / "base-4bit").is_dir():
                _save_prequantized(work)
            return record
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from fastsave.tiny import attach_lora, save_random_model

    torch.set_num_threads(os.cpu_count() or 1)
    work.mkdir(parents=True, exist_ok=True)
    config = size.config()
    for stale in ("base", "base-4bit", "adapter"):  # another size's files
        shutil.rmtree(work / stale, ignore_errors=True)
    record_path.unlink(missing_ok=True)
    save_random_model(config, work / "base")
    # The adapter is made on the 16-bit model loaded back (memory-mapped, nothing quantized: minutes
    # saved at 3B), so that it names the base directory; LoRA's own weights do not depend on W.
    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = attach_lora(
        base, r=rank, alpha=2 * rank, target_modules=targets + ["lm_head"] * size.lora_lm_head
    )
    model.save_pretrained(work / "adapter")
    del model, base
    if prequantized:
        _save_prequantized(work)
    from safetensors import safe_open

    nbytes = 0
    for file in sorted((work / "base").glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                nbytes += count * 2
    record = {
        **wanted,
        "output_bytes": nbytes,
        "parameters": nbytes // 2,
        "lora_parameters": size.linear_parameters + size.vocab * size.hidden * size.lora_lm_head,
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def prepare_in_subprocess(
    work: Path, size: ModelSize, rank: int = 16, prequantized: bool = False
) -> dict[str, Any]:
    """:func:`prepare` in a fresh process, so that the caller stays small and frees nothing late."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import benchlib; "
        "size = benchlib.ModelSize(**json.loads(sys.argv[3])); "
        "record = benchlib.prepare(Path(sys.argv[2]), size, int(sys.argv[4]), sys.argv[5] == '1'); "
        "print(benchlib.RESULT_MARK + json.dumps(record))"
    )
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(HERE),
            str(work),
            json.dumps(asdict(size)),
            str(rank),
            str(int(prequantized)),
        ],
        cwd=work,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"preparing the {size.describe()} model failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def check_disk(work: Path, needed: int) -> None:
    """Refuse before any work when ``work``'s filesystem has less than ``needed`` bytes free."""
    import shutil

    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(
            f"{work} has {free / 1e9:.1f} GB free, this run needs about {needed / 1e9:.1f} GB: "
            "pick fewer or smaller sizes, or --work on a larger disk"
        )


def _save_prequantized(work: Path) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    # The base quantized once (NF4, double quant, bf16 compute: what training loads) and saved:
    # bitsandbytes quantizes on the CPU at ~10 M parameters/s (minutes at 3B), and the compute-only
    # contenders would pay it on every run. Loading it gives the same codes and quant_state.
    from fastsave.tiny import load_4bit

    load_4bit(work / "base").save_pretrained(work / "base-4bit")


# --------------------------------------------------------------------------- memory counters


def proc_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon, RssFile and VmData, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData")
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) * 1024
    return values


def trim_and_reset_peak() -> dict[str, int]:
    """Free what Python and malloc hold unused, reset the VmHWM mark; return proc_status() after.

    malloc_trim first so that memory freed while loading does not hide the timed part's own
    allocations (and is not counted in VmData as held); clear_refs 5 resets VmHWM (Linux 4.0+).
    """
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return proc_status()


class PeakSampler:
    """A thread that samples RssAnon and VmData from /proc/self/status every ``interval`` seconds.

    The kernel keeps a peak of the whole RSS (VmHWM) but not of anonymous memory alone, and page
    cache of memory-mapped files (resident, reclaimable) makes VmHWM overstate what a save needs.
    Start it before the baseline is taken: its own thread stack then counts as held.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "VmData": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        with open("/proc/self/status", "rb") as handle:
            while True:
                try:
                    handle.seek(0)
                    for line in handle.read().split(b"\n"):
                        if line.startswith((b"RssAnon:", b"VmData:")):
                            key, value = line.split(b":")
                            key = key.decode()
                            self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
                    self.samples += 1
                except MemoryError:  # under a memory cap: skip this sample, keep the thread
                    pass
                if self._stop.wait(self.interval):
                    return

    def start(self) -> PeakSampler:
        """Start sampling; returns self."""
        self._thread.start()
        while self.samples == 0:  # the first sample exists before the caller takes its baseline
            time.sleep(0.0005)
        return self

    def reset(self) -> None:
        """Forget the peaks so far (call right after taking the baseline)."""
        self.peak = {"RssAnon": 0, "VmData": 0}

    def stop(self) -> dict[str, int]:
        """Stop the thread; return the peaks (bytes) seen since the last reset, one last sample included."""
        self._stop.set()
        self._thread.join()
        now = proc_status()
        return {key: max(value, now[key]) for key, value in self.peak.items()}


# --------------------------------------------------------------------------- a shared machine


def cpu_busy_seconds() -> float:
    """CPU seconds all processes of the machine have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, busy_below: float = 0.15, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine's CPUs are less than ``busy_below`` busy.

    Other processes on a small machine (2 cores here) slow a contender down by far more than their
    share: torch's OpenMP threads spin at barriers while one of them is descheduled. Returns the
    busy fraction of the last ``window``.
    """
    cores = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_busy_seconds()
        time.sleep(window)
        busy = (cpu_busy_seconds() - before) / (window * cores)
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


# --------------------------------------------------------------------------- running a contender


def run_contender(name: str, params: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run contender ``name`` of contenders.py in a fresh Python process and return its result.

    The result always has ``outcome``: "ok", "failed" (an exception in the timed part: ``error``
    and ``error_type`` say which), "crashed" (the process died without a result: a signal, a C
    allocation that aborted; ``returncode``), or "timeout". ``process_seconds`` is the wall time
    of the whole process (interpreter start and imports included).
    """
    command = [sys.executable, str(CONTENDERS_SCRIPT), name, json.dumps(params)]
    env = {**os.environ, **OFFLINE}
    env.pop("PYTHONPATH", None)
    # as installed: pip compiles a package's bytecode once; with PYTHONDONTWRITEBYTECODE set (some
    # sandboxes set it), every contender would compile fastsave's modules from source inside its
    # timed part (about 0.06 s of a 0.5 s save at 250M, measured)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=params["work"],  # outside the checkout: only installed packages import, as a user's do
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"name": name, "outcome": "timeout", "process_seconds": time.perf_counter() - started}
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    result = json.loads(lines[-1][len(RESULT_MARK) :]) if lines else {"name": name}
    if result.get("outcome") in (None, "running"):  # died in setup, or in the job
        result["outcome"] = "crashed"
    result["returncode"] = proc.returncode
    result["process_seconds"] = wall
    if result["outcome"] != "ok":
        result["stderr_tail"] = proc.stderr[-2000:]
    if result["outcome"] == "crashed":
        # Died without a result: under RLIMIT_DATA typically libgomp, which exits the process when
        # it cannot create an OpenMP worker thread ("libgomp: Thread creation failed").
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
        result["error"] = lines[-1] if lines else f"exit status {proc.returncode}, no message"
        result["error_type"] = "process exit"
        result["out_of_memory"] = any(text in proc.stderr for text in OUT_OF_MEMORY_MESSAGES)
    return result


# what a refused allocation says, in a Python exception or on a dying process's stderr
OUT_OF_MEMORY_MESSAGES = (
    "can't allocate memory",
    "Cannot allocate memory",
    "can't start new thread",
    "Thread creation failed",
    "MemoryError",
    "bad_alloc",
)


def emit_result(result: dict[str, Any]) -> None:
    """Child side: print the result line that run_contender reads."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- output


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(value: float | None) -> str:
    """Bytes as MiB for a table cell ('-' when unknown)."""
    return "-" if value is None else f"{value / MiB:.0f}"


def machine() -> str:
    """CPU count, RAM and the library versions, for a caption."""
    import platform

    cores = len(os.sched_getaffinity(0))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} CPU cores ({platform.processor() or platform.machine()}), {ram:.0f} GiB RAM"
