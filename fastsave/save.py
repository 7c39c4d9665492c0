"""The one save path that the patched method, the function and the CLI share.

Its flow, in this order, so that nothing is written before everything checkable was checked and
save_directory only ever holds its previous contents or the complete new checkpoint:

1. parse the options (fastsave.options) and check the model and the tokenizer;
2. preflight (:func:`staging_directory`, fastsave.io.staging): save_directory's path, kind and
   permissions, the lock, what dead saves left behind, a fresh staging directory;
3. build the plan (the merge plan's own code: one call);
4. check the disk space for the planned bytes (room for the previous and the new checkpoint, or
   the explicit ``replace_in_place``), then merge and write into the staging directory: the
   tokenizer first, the weights streamed (NaN/Inf checked and sha256 hashed on the way), config;
5. publish (fastsave.io.publish): verify the staged files, switch them in atomically;
6. on any error or Ctrl-C, remove what the save created; save_directory is untouched.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from fastsave.checkpoint_names import to_checkpoint_names
from fastsave.errors import DiskSpaceError
from fastsave.io.checkpoint_files import write_generation_config, write_merged_config, write_tokenizer
from fastsave.io.disk_space import FULL_DISK_ERRNOS
from fastsave.io.publish import publish
from fastsave.io.shards import ShardWriter, assign_shards
from fastsave.io.staging import PendingSave, check_space, pending_save
from fastsave.memory import MemoryBudget, peak_rss
from fastsave.options import SaveOptions, parse_options
from fastsave.plan import SavePlan, build_plan, unwrap_peft

logger = logging.getLogger("fastsave")
if not logger.handlers:  # notebooks show INFO lines without the user configuring logging
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def staging_directory(options: SaveOptions) -> Iterator[Path]:
    """Preflight a save into ``options.save_directory`` and yield the directory to write it into.

    On entry, before any merge: save_directory is checked (a file, a dangling symlink, a name too
    long, no permission, a checkpoint of the other kind: refused), its lock is taken (a second
    save into it fails at once), an interrupted earlier save is completed or rolled back, staging
    directories of dead saves are removed, and a fresh staging directory is made. Write into the
    yielded directory, then call :func:`fastsave.io.publish.publish` with it. On exit, whatever the
    save created and did not publish is removed and the lock released: on success, error or Ctrl-C.

    Raises:
        TargetError, MixedKindsError (ValueError): save_directory cannot take this save.
        SaveInProgressError: another save into save_directory is running.
        DiskSpaceError: the disk filled up (ENOSPC) while writing: nothing was published.
    """
    pending = PendingSave(
        options.save_directory, options.save_method, options.temporary_location, options.replace_in_place
    )
    try:
        yield pending.prepare()
    except OSError as error:
        if error.errno in FULL_DISK_ERRNOS and not isinstance(error, DiskSpaceError):
            raise DiskSpaceError(
                f"the disk filled up while saving to {options.save_directory} ({error}). Nothing was "
                "published: the directory keeps its previous contents. Free space, or save to another disk."
            ) from error
        raise
    finally:
        pending.close()


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse, before any work, a tokenizer argument that cannot be saved.

    Raises:
        TypeError: ``tokenizer`` is neither None nor something with ``save_pretrained``.
    """
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer or processor (something with save_pretrained), "
            f"got {type(tokenizer).__name__} {str(tokenizer)[:60]!r}; load it with "
            "AutoTokenizer.from_pretrained(...), or pass tokenizer=None. Nothing was written."
        )


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
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names.

    The disk-space check runs first, before any tensor is merged.

    Raises:
        DiskSpaceError: the checkpoint does not fit (nothing written), or the disk filled up.
        NonFiniteError: a tensor holds NaN/Inf (naming it).
    """
    shards = assign_shards(plan.tensors, options.max_shard_size, options.safe_serialization)
    check_space(directory, plan.total_bytes, len(shards))
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


def _save_merged(model: nn.Module, options: SaveOptions, staging: Path) -> dict[str, Any]:
    root = unwrap_peft(model)
    plan = to_checkpoint_names(root, build_merged_plan(model, options))
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
    return {"plan": plan, "shards": shards}


def _save_lora(model: nn.Module, options: SaveOptions, staging: Path) -> dict[str, Any]:
    if not hasattr(model, "peft_config"):
        raise ValueError(
            "save_method='lora' needs a peft model (or a transformers model with an adapter loaded)"
        )
    kwargs: dict[str, Any] = {"safe_serialization": options.safe_serialization}
    if options.adapter_names is not None:
        kwargs["selected_adapters"] = list(options.adapter_names)
    model.save_pretrained(str(staging), **kwargs)
    return {}


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
        save_directory: the output directory; it receives the complete checkpoint in one step and
            keeps every file that is not part of a checkpoint of this kind.
        tokenizer: its files are saved beside the weights when given.
        **options: see the README: save_method, dtype, base_weights, max_shard_size,
            safe_serialization, maximum_memory_usage, temporary_location, replace_in_place,
            push_to_hub, token, private, revision, commit_message, create_pr, is_main_process,
            adapter_names.

    Returns:
        The saved directory's path, or the hub URL when pushed.

    Raises:
        TypeError: an unknown option, or a tokenizer that is not one. ValueError: an invalid
            option, a save_directory that cannot take this save, or a model that cannot be saved
            as asked. SaveInProgressError: another save into save_directory is running.
            DiskSpaceError: not enough room. In every case save_directory keeps what it held.
    """
    opts = parse_options(save_directory, **options)
    _check_model(model, opts)
    check_tokenizer(tokenizer)
    if not opts.is_main_process:
        return str(opts.save_directory)
    started = time.perf_counter()
    with staging_directory(opts) as staging:
        # The tokenizer first: quick, and a tokenizer that cannot be saved fails before the merge.
        tokenizer_files = write_tokenizer(tokenizer, staging)
        if opts.save_method == "lora":
            report = _save_lora(model, opts, staging)
        elif opts.save_method == "merged_16bit":
            report = _save_merged(model, opts, staging)
        else:
            from fastsave.forced_4bit import save_merged_4bit_forced

            report = save_merged_4bit_forced(model, None, opts, staging)
        report["tokenizer_files"] = tokenizer_files
        pending = pending_save(staging)
        publish(staging, opts.save_directory)
        report["switch"] = pending.how
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
    if report.get("switch"):
        lines.append(f"  {report['switch']}")
    lines.append(f"  peak RSS {peak_rss() / 2**30:.2f} GiB")
    logger.info("\n".join(lines))
