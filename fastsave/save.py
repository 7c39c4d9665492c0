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

A save is solo (one process) or collective (every rank of a process group calls it: a sharded
FSDP / ZeRO-3 model, or ``fastsave merge`` under torchrun): the input says which
(fastsave.parallel.team). Collectively, the steps above are the same; rank 0 does 1-2 and 5 and
shares the staging path, every rank builds the plan (checked identical on all), each rank writes
the shards assigned to it by bytes (its producer still enters every gather of a sharded model, in
plan order), the ranks agree at every shard boundary and at the end, and only then does rank 0
write the index (with every rank's sha256 digests), config and tokenizer files, and publish.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from fastsave.errors import DiskSpaceError
from fastsave.inputs.base import SaveInput
from fastsave.inputs.live_model import LiveModelInput
from fastsave.io.adapter_files import apply_save_peft_format
from fastsave.io.disk_space import FULL_DISK_ERRNOS
from fastsave.io.model_card import write_model_card
from fastsave.io.publish import publish
from fastsave.io.shards import Shard, ShardWriter, assign_shards, write_index
from fastsave.io.staging import PendingSave, check_space, pending_save
from fastsave.io.variant import apply_variant
from fastsave.memory import ByteBudget, MemoryBudget, peak_rss, remove_spill_directory, spill_directory
from fastsave.merge.assemble import Assembler, assembling, block_bytes_for
from fastsave.merge.host_copies import release_cached_pinned_memory
from fastsave.options import SaveOptions, parse_options
from fastsave.parallel.ranks import LocalFailure
from fastsave.parallel.team import SaveTeam
from fastsave.plan.given_tensors import substitute_given_tensors
from fastsave.plan.items import Plan, PlanItem, SharedProducer
from fastsave.plan.layout import to_checkpoint_layout
from fastsave.plan.walk import unwrap_peft
from fastsave.vram import DeviceBudget

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
_DONE = object()  # the producer went through the whole schedule


class _Agreed(Exception):
    """An error every rank raises at the same meeting (the producer thread's agreement at a shard end)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Action(enum.Enum):
    """What one rank does with one planned tensor."""

    PRODUCE = "produce"  # compute it and hand its pieces to the writer
    PARTICIPATE = "participate"  # only enter the collectives producing it involves (item.participate)
    TAKE_PART = "take part"  # a group no part of which this rank writes: its collectives, once
    SKIP = "skip"  # nothing: another rank writes it and producing it involves no collective here


@dataclass
class Step:
    """One planned tensor in the producer's schedule; ``agree``: the ranks meet after it (a shard ends)."""

    item: PlanItem
    action: Action
    agree: bool = False


def schedule(plan: Plan, shards: list[Shard], owners: list[int], rank: int) -> list[Step]:
    """What ``rank`` does with each planned tensor, in plan order (every rank walks all of them).

    A rank produces the tensors of the shards it owns. For the others it enters only the
    collectives their production involves (a sharded model's gathers), so that every rank enters the
    same collectives in the same order. Parts made together (a :class:`SharedProducer` group) are
    made by every rank that writes one of them, which keeps only those; a rank that writes none
    takes part in the group's collectives once, at its first part.
    """
    owner_of = {t.name: owners[i] for i, shard in enumerate(shards) for t in shard.tensors}
    last_of_shard = {shard.tensors[-1].name for shard in shards if shard.tensors}
    groups: dict[int, SharedProducer] = {}
    owned_parts: dict[int, set[str]] = {}
    for item in plan.items:
        if item.group is not None:
            groups[id(item.group)] = item.group
            parts = owned_parts.setdefault(id(item.group), set())
            if owner_of[item.name] == rank:
                parts.add(item.name)
    for key, group in groups.items():
        if owned_parts[key]:
            group.keep(owned_parts[key])
    steps: list[Step] = []
    seen: set[int] = set()
    for item in plan.items:
        mine = owner_of[item.name] == rank
        if item.group is None:
            action = Action.PRODUCE if mine else (Action.PARTICIPATE if item.participate else Action.SKIP)
        elif mine:
            action = Action.PRODUCE
        elif owned_parts[id(item.group)] or id(item.group) in seen:
            action = Action.SKIP
        else:
            action = Action.TAKE_PART
        if item.group is not None:
            seen.add(id(item.group))
        steps.append(Step(item, action, item.name in last_of_shard))
    return steps


def _take_part(item: PlanItem) -> None:
    """The collectives producing ``item`` still involves on this rank, without producing it."""
    if item.group is not None:
        item.group.take_part()
    elif item.participate is not None:
        item.participate()


def _produce_into(
    steps: list[Step],
    plan: Plan,
    budget: ByteBudget,
    assembler: Assembler,
    sink: queue.Queue,
    stop: threading.Event,
    team: SaveTeam,
    failure: LocalFailure,
    cuda_device: int | None = None,
) -> None:
    """Producer thread: each scheduled tensor's pieces in plan order, admitted by bytes, then _END.

    An item's working memory is admitted before it is produced and given back when it is done;
    each piece is admitted before it is queued and given back when the writer has written it. The
    first error is handed to the writer thread, which re-raises it.

    In a collective save a rank whose work failed (here, or in the writer, which then sets
    ``stop``) keeps walking the schedule, entering only the collectives, and the ranks meet at each
    shard's end: there every rank raises (an :class:`_Agreed` error) as soon as any rank failed.
    ``cuda_device``: the CUDA device of the thread that started the save (a thread's current device
    is its own, and nccl's collectives and DeepSpeed's gathers use it).
    """
    try:
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
        with assembling(assembler):
            for step in steps:
                failed = failure.error is not None or stop.is_set()
                if step.action is Action.PRODUCE and not failed:
                    try:
                        if not _produce_one(step.item, budget, sink, stop):
                            if not team.collective:
                                return
                            _take_part(step.item)  # stopped by the writer's failure
                    except Exception as error:
                        if not team.collective:
                            raise
                        failure.error = failure.error or error
                        _take_part(step.item)
                elif step.action is Action.PRODUCE:
                    if not team.collective:
                        return
                    _take_part(step.item)
                elif step.action in (Action.PARTICIPATE, Action.TAKE_PART):
                    _take_part(step.item)
                if step.agree and team.collective:
                    try:
                        team.agree(failure.error, "writing the shards")
                    except BaseException as error:
                        sink.put(_Agreed(error))
                        return
        sink.put(_DONE)
    except BaseException as error:  # handed to the writer thread, which re-raises it
        sink.put(error)
    finally:
        if plan.release is not None:
            plan.release()


def _produce_one(item: PlanItem, budget: ByteBudget, sink: queue.Queue, stop: threading.Event) -> bool:
    """One tensor's pieces into ``sink``, then _END; False when ``stop`` ended it early."""
    if not budget.reserve(item.working_set(), stop):
        return False
    try:
        for piece in item.pieces():
            nbytes = piece.numel() * piece.element_size()
            if not budget.acquire(nbytes, stop):
                return False
            if not _put(sink, (piece, nbytes), stop):
                return False
            del piece
    finally:
        budget.unreserve()
    return _put(sink, _END, stop)


def _put(sink: queue.Queue, value: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            sink.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def write_merged_weights(
    plan: Plan, directory: Path, options: SaveOptions, team: SaveTeam | None = None
) -> list[str]:
    """Merge and stream every planned tensor into shards in ``directory``; return the shard names.

    The disk-space check runs first, before any tensor is merged. A producer thread computes the
    tensors' pieces ahead of the writer, as far as ``maximum_memory_usage`` allows
    (fastsave.memory): pieces waiting for the writer and the working memory of the tensor being
    merged are admitted by bytes; a tensor needed whole beyond the allowance is spilled to disk
    (fastsave.merge.assemble).

    ``team``: in a collective save (fastsave.parallel.team) every rank calls this with the same
    plan; each writes the shards assigned to it (balanced by bytes) and rank 0 the index, with the
    sha256 digests every rank computed. The memory allowance is shared by the ranks on one machine.

    Raises:
        DiskSpaceError: the checkpoint does not fit (nothing written), or the disk filled up.
        NonFiniteError: a tensor holds NaN/Inf (naming it).
        RankFailedError: another rank failed (naming it and its error).
    """
    team = team or SaveTeam.solo()
    shards = assign_shards(plan.items, options.max_shard_size, options.safe_serialization)
    owners = team.assign([shard.nbytes for shard in shards])
    mine = [shard for shard, owner in zip(shards, owners, strict=True) if owner == team.rank]
    space_error = None
    if team.publisher:
        try:
            check_space(directory, plan.total_bytes, len(shards))
        except Exception as error:
            space_error = error
    team.agree(space_error, "checking the disk space")
    writer = ShardWriter(directory, mine, options.safe_serialization, index=False)
    memory = MemoryBudget(options.maximum_memory_usage, team.local_world, sum(shard.nbytes for shard in mine))
    budget = ByteBudget(memory.allowance)
    spill = spill_directory(options.temporary_location, directory, team.rank if team.collective else None)
    # device blocks reach the host as pinned copies: a few of them and the pieces waiting must fit
    # the RAM allowance too
    device_memory = DeviceBudget(options.maximum_memory_usage, host_block_bytes=memory.allowance // 8)
    assembler = Assembler(spill, memory.whole_allowance, block_bytes_for(memory.allowance), device_memory)
    sink: queue.Queue = queue.Queue()  # bounded by the byte budget, not by a count
    stop = threading.Event()
    failure = LocalFailure()
    steps = schedule(plan, shards, owners, team.rank)
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    producer = threading.Thread(
        target=_produce_into,
        args=(steps, plan, budget, assembler, sink, stop, team, failure, cuda_device),
        daemon=True,
        name="fastsave-producer",
    )
    producer.start()
    progress = tqdm(
        total=sum(shard.nbytes for shard in mine),
        unit="B",
        unit_scale=True,
        desc="fastsave: merging",
        leave=False,
        disable=not team.publisher,
    )
    try:
        _write_pieces(sink, writer, budget, progress)
        writer.close()
    except BaseException as error:
        stop.set()
        writer.abort()
        agreed = isinstance(error, _Agreed)
        if agreed:
            producer.join(timeout=60)
            raise error.error from None
        if not team.collective or not isinstance(error, Exception):
            producer.join(timeout=60)
            raise
        # this rank's writing failed: the producer still walks the schedule (the other ranks need
        # this rank in every gather) until the ranks meet, where everyone raises
        failure.error = failure.error or error
        producer.join()
        _raise_agreed(sink)
        team.agree(failure.error, "writing the shards")
        raise  # pragma: no cover - agree raised
    finally:
        progress.close()
        stop.set()
        producer.join(timeout=60)
        remove_spill_directory(assembler.spill_directory)
        release_cached_pinned_memory()
    team.agree(None, "writing the shards")  # every rank's shards are complete (a barrier)
    if assembler.spilled_bytes:
        logger.info(
            "fastsave: %.2f GB of tensors needed whole were kept on disk (%s), not in memory",
            assembler.spilled_bytes / 1e9,
            assembler.spill_directory,
        )
    digests: dict[str, str] = {}
    for each in team.gather(writer.digests):
        digests.update(each)
    if team.publisher and len(shards) > 1:
        write_index(directory, shards, digests, options.safe_serialization)
    return [s.filename for s in shards]


def _write_pieces(sink: queue.Queue, writer: ShardWriter, budget: ByteBudget, progress: Any) -> None:
    """The writer thread's loop: pieces into shards until the producer is done (or hands an error)."""
    while True:
        item = sink.get()
        if item is _DONE:
            return
        if isinstance(item, _Agreed):
            raise item
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            writer.end_tensor()
            continue
        piece, nbytes = item
        writer.write_piece(piece)
        del piece, item
        budget.release(nbytes)
        progress.update(nbytes)


def _raise_agreed(sink: queue.Queue) -> None:
    """Raise the error the ranks agreed on in the producer thread, if it got that far."""
    while True:
        try:
            item = sink.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, _Agreed):
            raise item.error
        if isinstance(item, BaseException):  # the collectives themselves failed: no meeting is possible
            raise item


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


T = TypeVar("T")


def _everyone(team: SaveTeam, work: Callable[[], T], what: str) -> T:
    """Run ``work`` on every rank; if it fails anywhere, every rank raises (solo: its error as it is)."""
    failure = LocalFailure()
    result = None
    with failure.capture():
        result = work()
    team.agree(failure.error, what)
    return result  # type: ignore[return-value]


def plan_signature(plan: Plan, save_input: SaveInput) -> object:
    """What every rank of a collective save must have computed identically: the plan, and the input's own."""
    items = [
        (i.name, i.shape, str(i.dtype), i.lora_module, i.planned_by, i.group is not None) for i in plan.items
    ]
    signature = getattr(save_input, "signature", None)
    return (str(plan.dtype), items, signature() if callable(signature) else None)


def run_save(save_input: SaveInput, opts: SaveOptions) -> str:
    """Save ``save_input`` as ``opts`` asks: plan, merge and write into staging, publish in one step.

    The input's ``team`` (fastsave.parallel.team; solo when it has none) says which ranks take part.

    Returns the saved directory's path, or the hub URL when pushed.
    """
    team: SaveTeam = getattr(save_input, "team", None) or SaveTeam.solo()
    started = time.perf_counter()
    report: dict[str, Any] = {}
    team.roll_call(
        "save_pretrained_merged on a sharded model" if hasattr(save_input, "sharded") else "the save"
    )
    with team.staging(staging_directory(opts)) as staging:
        if opts.save_method == "lora":  # the adapter's files: small, written by rank 0 alone
            failure = LocalFailure()
            if team.publisher:
                with failure.capture():
                    report["tokenizer_files"] = save_input.write_adapter(staging, opts)
                    apply_save_peft_format(staging, opts.save_peft_format)
            team.outcome(failure.error, "writing the adapter")
        else:
            plan = _everyone(team, lambda: output_plan(save_input, opts), "planning the save")
            team.check_same(plan_signature(plan, save_input), "the plan of the save")
            if not opts.safe_serialization and team.publisher:
                warnings.warn(
                    "safe_serialization=False writes legacy torch .bin shards, which hold one shard in RAM "
                    "while saving and load through pickle; prefer safetensors",
                    UserWarning,
                    stacklevel=3,
                )
            report["shards"] = write_merged_weights(plan, staging, opts, team)
            report["plan"] = plan
            if team.publisher:
                failure = LocalFailure()
                with failure.capture():
                    keep_quantization = opts.save_method == "merged_4bit_forced"
                    report["tokenizer_files"] = save_input.write_files(staging, plan, opts, keep_quantization)
                    report["merged_into"] = save_input.describe(plan)
                team.outcome(failure.error, "writing config and tokenizer files")
            else:
                team.outcome(None, "writing config and tokenizer files")
        if team.publisher:
            failure = LocalFailure()
            with failure.capture():
                apply_variant(staging, opts.variant)  # variant=: model.<variant>.safetensors
                if save_input.model is not None:
                    write_model_card(save_input.model, opts, staging, report)  # never over the user's own
                pending = pending_save(staging)
                publish(staging, opts.save_directory)
                report["switch"] = pending.how
            team.outcome(failure.error, "publishing")
        else:
            team.outcome(None, "publishing")
    if team.publisher:
        _log_summary(opts, report, time.perf_counter() - started, team)
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        url = None
        failure = LocalFailure()
        if team.publisher:
            with failure.capture():
                url = upload_directory(opts)
        team.outcome(failure.error, "uploading to the hub")
        return team.share_from_publisher(url)
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
    from fastsave.inputs.sharded_model import ShardedModelInput, is_sharded

    if is_sharded(model):
        # every rank holds part of every weight: every rank takes part, whatever is_main_process says
        if opts.save_method == "lora":
            raise ValueError(
                "save_method='lora' is not supported for a sharded (FSDP / ZeRO-3) model: save the adapter "
                "with your trainer's own state-dict gathering, or save it merged (merged_16bit) here"
            )
        return run_save(ShardedModelInput(model, tokenizer), opts)
    if not opts.is_main_process:
        return str(opts.save_directory)
    return run_save(LiveModelInput(model, tokenizer), opts)


def _log_summary(opts: SaveOptions, report: dict[str, Any], seconds: float, team: SaveTeam) -> None:
    plan: Plan | None = report.get("plan")
    ranks = f" by {team.world} ranks" if team.collective else ""
    lines = [f"fastsave: saved {opts.save_method} to {opts.save_directory}{ranks} in {seconds:.1f}s"]
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
    distributed: bool = False,
    **options: Any,
) -> str:
    """Merge the adapter saved in ``adapter_dir`` into its 16-bit base on disk and save to ``out_dir``.

    The same save as :func:`save_pretrained_merged`, from a saved adapter instead of a model in
    memory (fastsave.inputs.saved_adapter): ``base`` is the 16-bit base (a local directory or a repo
    in the local HF cache; default: the adapter's base_model_name_or_path), ``quant`` the 4-bit
    settings training used (fastsave.sources.bnb_4bit.Quant4bitSettings; default: the QLoRA
    defaults), ``options`` those of :func:`save_pretrained_merged`. ``distributed``: called on every
    rank of the default process group (``torchrun ... -m fastsave merge``), which share the work:
    each rank merges and writes the shards assigned to it; the output is the same, byte for byte.

    Returns:
        The saved directory's path.

    Raises:
        PlanError / ValueError: a missing adapter or base, an unsupported adapter, an invalid
            option; nothing is written then.
    """
    from fastsave.inputs.saved_adapter import SavedAdapterInput

    opts = parse_options(out_dir, **options)
    save_input = SavedAdapterInput(adapter_dir, base, quant)
    if distributed:
        save_input.team = SaveTeam.of_process_group()
    return run_save(save_input, opts)
