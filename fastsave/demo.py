"""``fastsave demo``: the whole job end to end on a tiny model built on this machine.

Builds a tiny Llama and a tokenizer (no downloads), quantizes it to NF4 with bitsandbytes,
attaches a LoRA adapter and trains it a few steps on local text, saves it merged with
fastsave, reloads the result with plain transformers and reports what it checked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsave.memory import peak_rss


@dataclass
class DemoReport:
    """What the demo measured."""

    output_dir: str
    losses: list[float]
    max_weight_error: float  # saved weight vs float32 reference rounded once; 0.0 means bit-exact
    max_logit_error: float  # reloaded 16-bit model vs the trained 4-bit peft model
    argmax_agreement: float  # fraction of positions where both predict the same next token
    files: list[str] = field(default_factory=list)
    save_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_rss_bytes: int = 0


def run_demo(output_dir: str | Path | None = None, train_steps: int = 6) -> DemoReport:
    """Run the demo and return its report; raise if any check fails.

    ``output_dir``: where the merged checkpoint goes (None: a new temporary directory, which stays
    for the user to look at). The tiny base model it builds is removed at the end, however it ends.
    """
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fastsave-demo-"))
    output_dir = Path(output_dir) if output_dir is not None else workdir / "merged"
    base_dir = workdir / "base"
    try:
        return _run_in(base_dir, output_dir, train_steps, started)
    finally:
        # the tiny base model and its tokenizer are the demo's scratch, made here: only the merged
        # checkpoint stays (in the temporary directory when no output directory was given)
        shutil.rmtree(base_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.rmdir()  # empty unless the merged checkpoint is in it


def _run_in(base_dir: Path, output_dir: Path, train_steps: int, started: float) -> DemoReport:
    """The demo's work: the tiny base model built in ``base_dir``, the merged one saved to ``output_dir``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastsave
    from fastsave.oracle import reference_merged_weight
    from fastsave.tiny import (
        TINY_TEXT,
        attach_lora,
        build_tiny_tokenizer,
        load_4bit,
        save_random_model,
        tiny_llama_config,
    )
    from fastsave.tiny import train_steps as run_training

    save_random_model(tiny_llama_config(hidden_size=128, intermediate_size=256), base_dir)
    build_tiny_tokenizer(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = attach_lora(load_4bit(base_dir), r=8, alpha=16, random_b=False)
    losses = run_training(model, tokenizer, steps=train_steps)

    # The float32 reference, from bitsandbytes and peft only, before anything runs in inference mode.
    references = {
        name.removeprefix("base_model.model.") + ".weight": reference_merged_weight(module)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
    }
    fastsave.patch(model)
    save_started = time.perf_counter()
    model.save_pretrained_merged(output_dir, tokenizer, save_method="merged_16bit")
    save_seconds = time.perf_counter() - save_started

    files = sorted(p.name for p in output_dir.iterdir())
    index = output_dir / "model.safetensors.index.json"
    shard_of = json.loads(index.read_text())["weight_map"] if index.exists() else None
    max_weight_error = 0.0
    for name, reference in references.items():
        shard = shard_of[name] if shard_of else "model.safetensors"
        with safe_open(output_dir / shard, framework="pt") as handle:
            saved = handle.get_tensor(name)
        expected = reference.to(saved.dtype)
        max_weight_error = max(max_weight_error, (saved.float() - expected.float()).abs().max().item())

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    batch = tokenizer([line for line in TINY_TEXT.splitlines() if line], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = model(**batch).logits.float()
        merged = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    max_logit_error = (trained - merged).abs()[mask].max().item()
    agreement = (trained.argmax(-1) == merged.argmax(-1))[mask].float().mean().item()
    report = DemoReport(
        output_dir=str(output_dir),
        losses=losses,
        max_weight_error=max_weight_error,
        max_logit_error=max_logit_error,
        argmax_agreement=agreement,
        files=files,
        save_seconds=save_seconds,
        total_seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss(),
    )
    if max_weight_error != 0.0:
        raise RuntimeError(
            f"demo check failed: merged weights differ from the float32 reference by {max_weight_error}"
        )
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise RuntimeError(f"demo check failed: incomplete checkpoint {files}")
    return report


def format_report(report: DemoReport) -> str:
    """The demo's report as the lines the CLI prints."""
    return "\n".join(
        [
            f"fastsave demo: merged checkpoint in {report.output_dir}",
            f"  training loss        {report.losses[0]:.3f} -> {report.losses[-1]:.3f} ({len(report.losses)} steps)",
            f"  max weight error     {report.max_weight_error:g} vs float32 reference (bnb dequantize + peft delta)"
            + ("  [bit-exact]" if report.max_weight_error == 0 else ""),
            f"  logits               max |diff| {report.max_logit_error:.4f} (reloaded 16-bit vs trained 4-bit), "
            f"argmax agreement {report.argmax_agreement:.1%}",
            f"  files                {', '.join(report.files)}",
            f"  time                 save {report.save_seconds:.2f}s, whole demo {report.total_seconds:.1f}s",
            f"  peak RSS             {report.peak_rss_bytes / 2**20:.0f} MiB",
        ]
    )
