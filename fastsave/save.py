"""The one save path: the patched method, the function and the command line all run :func:`run_save`.

Every save goes input -> plan -> producer -> writer -> directory (docs/ARCHITECTURE.md): the input
(fastsave.inputs) becomes a plan (fastsave.plan), whose items a producer thread computes in order
(fastsave.merge) while the writer streams them into shards in a staging directory, which is
published into save_directory in one step.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from fastsave.disk_space import check_free_space
from fastsave.inputs.base import SaveInput
from fastsave.inputs.live_model import LiveModelInput
from fastsave.io.adapter_files import apply_save_peft_format
from fastsave.io.model_card import write_model_card
from fastsave.io.variant import apply_variant
from fastsave.memory import MemoryBudget, peak_rss
from fastsave.options import SaveOptions, parse_options
from fastsave.plan.given_tensors import substitute_given_tensors
from fastsave.plan.items import Plan
from fastsave.plan.layout import to_checkpoint_layout
from fastsave.plan.walk import unwrap_peft
from fastsave.writer import ShardWriter, assign_shards, publish

logger = logging.getLogger("fastsave")
if not logger.handlers:  # notebooks show INFO lines without the user configuring logging
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def staging_directory(options: SaveOptions) -> Iterator[Path]:
    """A fresh hidden directory that is removed afterwards, on success, error or Ctrl-C."""
    parent = options.temporary_location or options.save_directory.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again when empty
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".fastsave-staging-{options.save_directory.name}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        # Innermost first; e.g. temporary_location="_unsloth_temporary_saved_buffers" goes again.
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _produce_into(plan: Plan, budget: MemoryBudget, sink: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: merge tensors in plan order; hand each (or the first error) to the writer."""
    try:
        for planned in plan.items:
            if stop.is_set():
                return
            tensor = planned.produce()
            while not stop.is_set():
                try:
                    sink.put(tensor, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as error:  # handed to the writer thread, which re-raises it
        sink.put(error)


def write_merged_weights(plan: Plan, directory: Path, options: SaveOptions) -> list[str]:
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names."""
    shards = assign_shards(plan.items, options.max_shard_size, options.safe_serialization)
    check_free_space(plan.total_bytes, directory, options.save_directory)
    writer = ShardWriter(directory, shards, options.safe_serialization)
    budget = MemoryBudget(options.maximum_memory_usage, max((t.nbytes for t in plan.items), default=0))
    # Merging overlaps writing: a producer thread runs ahead by at most the budgeted depth.
    sink: queue.Queue = queue.Queue(maxsize=budget.prefetch_depth())
    stop = threading.Event()
    producer = threading.Thread(target=_produce_into, args=(plan, budget, sink, stop), daemon=True)
    producer.start()
    progress = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="fastsave: merging", leave=False)
    try:
        for planned in plan.items:
            item = sink.get()
            if isinstance(item, BaseException):
                raise item
            writer.write(item)
            progress.update(planned.nbytes)
            del item
        writer.close()
    except BaseException:
        stop.set()
        writer.abort()
        raise
    finally:
        progress.close()
        stop.set()
        producer.join(timeout=60)
    return [s.filename for s in shards]


def output_plan(save_input: SaveInput, opts: SaveOptions) -> Plan:
    """The plan the writer writes: the checked merged plan, re-quantized for a 4-bit save, in checkpoint layout."""
    plan = save_input.merged_plan(opts)
    if opts.save_method == "merged_4bit_forced":
        from fastsave.formats.requantize_4bit import requantize_plan, warn_accuracy_loss

        save_input.quantization_config(plan)  # refuses a model without 4-bit settings before any work
        warn_accuracy_loss()
        plan = requantize_plan(plan)
    plan = to_checkpoint_layout(save_input.root, plan)
    return substitute_given_tensors(plan, opts.state_dict)  # state_dict=: given tensors win


def run_save(save_input: SaveInput, opts: SaveOptions) -> str:
    """Save ``save_input`` as ``opts`` asks: plan, merge and write into staging, publish in one step.

    Returns the saved directory's path, or the hub URL when pushed.
    """
    started = time.perf_counter()
    report: dict[str, Any] = {}
    with staging_directory(opts) as staging:
        if opts.save_method == "lora":
            report["tokenizer_files"] = save_input.write_adapter(staging, opts)
            apply_save_peft_format(staging, opts.save_peft_format)
        else:
            plan = output_plan(save_input, opts)
            if not opts.safe_serialization:
                warnings.warn(
                    "safe_serialization=False writes legacy torch .bin shards, which hold one shard in RAM "
                    "while saving and load through pickle; prefer safetensors",
                    UserWarning,
                    stacklevel=3,
                )
            report["shards"] = write_merged_weights(plan, staging, opts)
            keep_quantization = opts.save_method == "merged_4bit_forced"
            report["tokenizer_files"] = save_input.write_files(staging, plan, opts, keep_quantization)
            report["plan"] = plan
            report["merged_into"] = save_input.describe(plan)
        apply_variant(staging, opts.variant)  # variant=: model.<variant>.safetensors
        if save_input.model is not None:
            write_model_card(save_input.model, opts, staging, report)  # README.md, never over the user's own
        publish(staging, opts.save_directory)
    _log_summary(opts, report, time.perf_counter() - started)
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        return upload_directory(opts)
    return str(opts.save_directory)


def _check_model(model: nn.Module, options: SaveOptions) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a peft or transformers model), got {type(model).__name__}"
        )
    if getattr(unwrap_peft(model), "config", None) is None and options.save_method != "lora":
        raise ValueError("model has no transformers config; fastsave saves transformers models")


def save_pretrained_merged(
    model: nn.Module, save_directory: str | Path, tokenizer: Any = None, **options: Any
) -> str:
    """Save ``model`` as a LoRA adapter, a merged 16-bit checkpoint, or a merged 4-bit one.

    Args:
        model: a peft model (or a transformers model with a LoRA adapter), 4-bit, 8-bit or 16-bit.
        save_directory: the output directory; it receives the complete checkpoint in one step.
        tokenizer: its files are saved beside the weights when given.
        **options: see the README: save_method, dtype, base_weights, max_shard_size,
            safe_serialization, maximum_memory_usage, temporary_location, push_to_hub, token,
            private, revision, commit_message, create_pr, is_main_process, adapter_names.

    Returns:
        The saved directory's path, or the hub URL when pushed.

    Raises:
        TypeError: an unknown option. ValueError: an invalid option or a model that cannot be
            saved as asked. Either way nothing was written.
    """
    opts = parse_options(save_directory, **options)
    _check_model(model, opts)
    if not opts.is_main_process:
        return str(opts.save_directory)
    return run_save(LiveModelInput(model, tokenizer), opts)


def _log_summary(opts: SaveOptions, report: dict[str, Any], seconds: float) -> None:
    plan: Plan | None = report.get("plan")
    lines = [f"fastsave: saved {opts.save_method} to {opts.save_directory} in {seconds:.1f}s"]
    if plan is not None:
        lines.append(
            f"  merged {len(plan.merged_modules)} LoRA modules into {report['merged_into']}; "
            f"{len(plan.items)} tensors, {plan.total_bytes / 1e9:.2f} GB as {str(plan.dtype).removeprefix('torch.')}"
            f" in {len(report['shards'])} shard(s)"
        )
        if opts.save_method == "merged_4bit_forced":
            from fastsave.formats.requantize_4bit import requantized_settings

            settings = requantized_settings(plan)
            count = sum(1 for item in plan.items if item.requantize is not None)
            lines.append(
                f"  re-quantized {count} weights to 4-bit ({'; '.join(s.describe() for s in settings)})"
            )
        if plan.untied_embeddings:
            lines.append(
                "  the adapter changed one of the tied embeddings: both written, tie_word_embeddings=false"
            )
    if report.get("tokenizer_files"):
        lines.append(f"  tokenizer files: {', '.join(report['tokenizer_files'])}")
    elif opts.save_method != "lora":
        lines.append("  no tokenizer given: pass one to save its files beside the model")
    lines.append(f"  peak RSS {peak_rss() / 2**30:.2f} GiB")
    logger.info("\n".join(lines))


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    quant: Any = None,
    **options: Any,
) -> str:
    """Merge the adapter saved in ``adapter_dir`` into its 16-bit base on disk and save to ``out_dir``.

    The same save as :func:`save_pretrained_merged`, from a saved adapter instead of a model in
    memory (fastsave.inputs.saved_adapter): ``base`` is the 16-bit base (a local directory or a repo
    in the local HF cache; default: the adapter's base_model_name_or_path), ``quant`` the 4-bit
    settings training used (fastsave.sources.bnb_4bit.Quant4bitSettings; default: the QLoRA
    defaults), ``options`` those of :func:`save_pretrained_merged`.

    Returns:
        The saved directory's path.

    Raises:
        PlanError / ValueError: a missing adapter or base, an unsupported adapter, an invalid
            option; nothing is written then.
    """
    from fastsave.inputs.saved_adapter import SavedAdapterInput

    opts = parse_options(out_dir, **options)
    return run_save(SavedAdapterInput(adapter_dir, base, quant), opts)
