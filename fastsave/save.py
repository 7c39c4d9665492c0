"""The one save path that the patched method, the function and the CLI share."""

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

from fastsave.checkpoint_files import write_generation_config, write_merged_config, write_tokenizer
from fastsave.checkpoint_names import to_checkpoint_names
from fastsave.disk_space import check_free_space
from fastsave.given_state_dict import substitute_given_tensors
from fastsave.io.adapter_files import apply_save_peft_format
from fastsave.io.model_card import write_model_card
from fastsave.io.variant import apply_variant
from fastsave.memory import MemoryBudget, peak_rss
from fastsave.options import SaveOptions, parse_options
from fastsave.plan import SavePlan, build_plan, unwrap_peft
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


def _produce_into(plan: SavePlan, budget: MemoryBudget, sink: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: merge tensors in plan order; hand each (or the first error) to the writer."""
    try:
        for planned in plan.tensors:
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


def write_merged_weights(plan: SavePlan, directory: Path, options: SaveOptions) -> list[str]:
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names."""
    shards = assign_shards(plan.tensors, options.max_shard_size, options.safe_serialization)
    check_free_space(plan.total_bytes, directory, options.save_directory)
    writer = ShardWriter(directory, shards, options.safe_serialization)
    budget = MemoryBudget(options.maximum_memory_usage, max((t.nbytes for t in plan.tensors), default=0))
    # Merging overlaps writing: a producer thread runs ahead by at most the budgeted depth.
    sink: queue.Queue = queue.Queue(maxsize=budget.prefetch_depth())
    stop = threading.Event()
    producer = threading.Thread(target=_produce_into, args=(plan, budget, sink, stop), daemon=True)
    producer.start()
    progress = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="fastsave: merging", leave=False)
    try:
        for planned in plan.tensors:
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


def build_merged_plan(model: nn.Module, options: SaveOptions) -> SavePlan:
    """The 16-bit merged plan, into the dequantized weights or the original checkpoint's (base_weights)."""
    if options.base_weights == "original":
        from fastsave.original_base import build_original_plan

        return build_original_plan(model, options)
    return build_plan(model, options.dtype, options.adapter_names)


def _save_merged(model: nn.Module, tokenizer: Any, options: SaveOptions, staging: Path) -> dict[str, Any]:
    root = unwrap_peft(model)
    plan = to_checkpoint_names(root, build_merged_plan(model, options))
    plan = substitute_given_tensors(plan, options.state_dict)  # state_dict=: given tensors win
    if not options.safe_serialization:
        warnings.warn(
            "safe_serialization=False writes legacy torch .bin shards, which hold one shard in RAM while "
            "saving and load through pickle; prefer safetensors",
            UserWarning,
            stacklevel=3,
        )
    shards = write_merged_weights(plan, staging, options)
    write_merged_config(root, staging, plan.dtype, plan.untied_embeddings)
    write_generation_config(root, staging)
    tokenizer_files = write_tokenizer(tokenizer, staging)
    return {"plan": plan, "shards": shards, "tokenizer_files": tokenizer_files}


def _save_lora(model: nn.Module, tokenizer: Any, options: SaveOptions, staging: Path) -> dict[str, Any]:
    if not hasattr(model, "peft_config"):
        raise ValueError(
            "save_method='lora' needs a peft model (or a transformers model with an adapter loaded)"
        )
    kwargs: dict[str, Any] = {"safe_serialization": options.safe_serialization}
    if options.adapter_names is not None:
        kwargs["selected_adapters"] = list(options.adapter_names)
    if options.state_dict is not None:  # peft takes the adapter's tensors from it
        kwargs["state_dict"] = options.state_dict
    model.save_pretrained(str(staging), **kwargs)
    apply_save_peft_format(staging, options.save_peft_format)
    return {"tokenizer_files": write_tokenizer(tokenizer, staging)}


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
        **options: see DESIGN.md / README: save_method, dtype, base_weights, max_shard_size,
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
    started = time.perf_counter()
    with staging_directory(opts) as staging:
        if opts.save_method == "lora":
            report = _save_lora(model, tokenizer, opts, staging)
        elif opts.save_method == "merged_16bit":
            report = _save_merged(model, tokenizer, opts, staging)
        else:
            from fastsave.forced_4bit import save_merged_4bit_forced

            report = save_merged_4bit_forced(model, tokenizer, opts, staging)
        apply_variant(staging, opts.variant)  # variant=: model.<variant>.safetensors
        write_model_card(model, opts, staging, report)  # README.md, never over the user's own
        publish(staging, opts.save_directory)
    _log_summary(opts, report, time.perf_counter() - started)
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        return upload_directory(opts)
    return str(opts.save_directory)


def _base_kinds(plan: SavePlan) -> str:
    """'dequantized 4-bit', '8-bit', '16-bit' or a mix, for the save log."""
    from fastsave.quantized import is_4bit, is_8bit

    kinds = []
    for target in plan.lora_targets:
        base = target.layer.get_base_layer()
        kind = "dequantized 4-bit" if is_4bit(base) else "dequantized 8-bit" if is_8bit(base) else "16-bit"
        if kind not in kinds:
            kinds.append(kind)
    return " and ".join(kinds) or "none"


def _log_summary(opts: SaveOptions, report: dict[str, Any], seconds: float) -> None:
    plan: SavePlan | None = report.get("plan")
    lines = [f"fastsave: saved {opts.save_method} to {opts.save_directory} in {seconds:.1f}s"]
    if plan is not None:
        source = (
            f"the base weights the adapter was trained against ({_base_kinds(plan)})"
            if opts.base_weights == "dequantized"
            else "the original 16-bit base checkpoint"
        )
        lines.append(
            f"  merged {len(plan.lora_targets)} LoRA modules into {source}; "
            f"{len(plan.tensors)} tensors, {plan.total_bytes / 1e9:.2f} GB as {str(plan.dtype).removeprefix('torch.')}"
            f" in {len(report['shards'])} shard(s)"
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
