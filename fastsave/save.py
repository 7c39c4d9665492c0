"""The one save path: the patched method, the function and the command line all run :func:`run_save`.

Every save goes input -> plan -> producer -> writer -> directory (docs/ARCHITECTURE.md): the input
(fastsave.inputs) becomes a plan (fastsave.plan), whose items a producer thread computes in order
(fastsave.merge) while the writer streams them into shards in a staging directory, which is
published into save_directory in one step. In this order, so that nothing is written before
everything checkable was checked and save_directory only ever holds its previous contents or the
complete new checkpoint:

1. parse the options (fastsave.options) and check the model and the tokenizer;
2. preflight (:func:`staging_directory`, fastsave.io.staging): save_directory's path, kind and
   permissions, the lock, what dead saves left behind, a fresh staging directory;
3. build the plan (the input's own code: one call);
4. check the disk space for the planned bytes (room for the previous and the new checkpoint, or
   the explicit ``replace_in_place``), then merge and write into the staging directory (NaN/Inf
   checked and sha256 hashed on the way), config and tokenizer files;
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

from fastsave.errors import DiskSpaceError
from fastsave.inputs.base import SaveInput
from fastsave.inputs.live_model import LiveModelInput
from fastsave.io.adapter_files import apply_save_peft_format
from fastsave.io.disk_space import FULL_DISK_ERRNOS
from fastsave.io.model_card import write_model_card
from fastsave.io.publish import publish
from fastsave.io.shards import ShardWriter, assign_shards
from fastsave.io.staging import PendingSave, check_space, pending_save
from fastsave.io.variant import apply_variant
from fastsave.memory import ByteBudget, MemoryBudget, peak_rss, remove_spill_directory, spill_directory
from fastsave.merge.assemble import Assembler, assembling
from fastsave.options import SaveOptions, parse_options
from fastsave.plan.given_tensors import substitute_given_tensors
from fastsave.plan.items import Plan
from fastsave.plan.layout import to_checkpoint_layout
from fastsave.plan.walk import unwrap_peft

logger = logging.getLogger("fastsave")
if not logger.handlers:  # notebooks show INFO lines without the user configuring logging
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def staging_directory(options: SaveOptions, kind: str | None = None) -> Iterator[Path]:
    """Preflight a save into ``options.save_directory`` and yield the directory to write it into.

    On entry, before any merge: save_directory is checked (a file, a dangling symlink, a name too
    long, no permission, a checkpoint of the other kind: refused), its lock is taken (a second
    save into it fails at once), an interrupted earlier save is completed or rolled back, staging
    directories of dead saves are removed, and a fresh staging directory is made. Write into the
    yielded directory, then call :func:`fastsave.io.publish.publish` with it. On exit, whatever the
    save created and did not publish is removed and the lock released: on success, error or Ctrl-C.

    ``kind``: what the save writes (fastsave.io.ownership: ADAPTER, MERGED, GGUF); None: from
    ``options.save_method``.

    Raises:
        TargetError, MixedKindsError (ValueError): save_directory cannot take this save.
        SaveInProgressError: another save into save_directory is running.
        DiskSpaceError: the disk filled up (ENOSPC) while writing: nothing was published.
    """
    pending = PendingSave(
        options.save_directory,
        options.save_method,
        options.temporary_location,
        options.replace_in_place,
        kind=kind,
        variant=options.variant,
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


_END = object()  # marks the end of one tensor's pieces in the queue


def _produce_into(
    plan: Plan, budget: ByteBudget, assembler: Assembler, sink: queue.Queue, stop: threading.Event
) -> None:
    """Producer thread: each planned tensor's pieces in plan order, admitted by bytes, then _END.

    An item's working memory is admitted before it is produced and given back when it is done;
    each piece is admitted before it is queued and given back when the writer has written it. The
    first error is handed to the writer thread, which re-raises it.
    """
    try:
        with assembling(assembler):
            for item in plan.items:
                if not budget.reserve(item.working_bytes, stop):
                    return
                try:
                    for piece in item.pieces():
                        nbytes = piece.numel() * piece.element_size()
                        if not budget.acquire(nbytes, stop):
                            return
                        if not _put(sink, (piece, nbytes), stop):
                            return
                        del piece
                finally:
                    budget.unreserve()
                if not _put(sink, _END, stop):
                    return
    except BaseException as error:  # handed to the writer thread, which re-raises it
        sink.put(error)


def _put(sink: queue.Queue, value: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            sink.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def write_merged_weights(plan: Plan, directory: Path, options: SaveOptions) -> list[str]:
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names.

    The disk-space check runs first, before any tensor is merged. A producer thread computes the
    tensors' pieces ahead of the writer, as far as ``maximum_memory_usage`` allows
    (fastsave.memory): pieces waiting for the writer and the working memory of the tensor being
    merged are admitted by bytes; a tensor needed whole beyond the allowance is spilled to disk
    (fastsave.merge.assemble).

    Raises:
        DiskSpaceError: the checkpoint does not fit (nothing written), or the disk filled up.
        NonFiniteError: a tensor holds NaN/Inf (naming it).
    """
    shards = assign_shards(plan.items, options.max_shard_size, options.safe_serialization)
    check_space(directory, plan.total_bytes, len(shards))
    writer = ShardWriter(directory, shards, options.safe_serialization)
    memory = MemoryBudget(options.maximum_memory_usage)
    budget = ByteBudget(memory.allowance)
    assembler = Assembler(spill_directory(options.temporary_location, directory), memory.allowance // 2)
    sink: queue.Queue = queue.Queue()  # bounded by the byte budget, not by a count
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce_into,
        args=(plan, budget, assembler, sink, stop),
        daemon=True,
        name="fastsave-producer",
    )
    producer.start()
    progress = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="fastsave: merging", leave=False)
    try:
        for _ in plan.items:
            while True:
                item = sink.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    writer.end_tensor()
                    break
                piece, nbytes = item
                writer.write_piece(piece)
                del piece, item
                budget.release(nbytes)
                progress.update(nbytes)
        writer.close()
    except BaseException:
        stop.set()
        writer.abort()
        raise
    finally:
        progress.close()
        stop.set()
        producer.join(timeout=60)
        remove_spill_directory(assembler.spill_directory)
    if assembler.spilled_bytes:
        logger.info(
            "fastsave: %.2f GB of tensors needed whole were kept on disk (%s), not in memory",
            assembler.spilled_bytes / 1e9,
            assembler.spill_directory,
        )
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
        pending = pending_save(staging)
        publish(staging, opts.save_directory)
        report["switch"] = pending.how
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
        save_directory: the output directory; it receives the complete checkpoint in one step and
            keeps every file that is not part of a checkpoint of this kind.
        tokenizer: its files are saved beside the weights when given.
        **options: see the README: save_method, dtype, base_weights, max_shard_size,
            safe_serialization, maximum_memory_usage, temporary_location, push_to_hub, token,
            private, revision, commit_message, create_pr, is_main_process, adapter_names.

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
    if report.get("switch"):
        lines.append(f"  {report['switch']}")
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
