"""The public entry points: save a model in memory, merge a saved adapter, push to the hub.

Each turns its arguments into options (fastsave.options) and an input (fastsave.inputs), and runs
the one save path (:func:`fastsave.pipeline.run.run_save`). ``fastsave.patch`` binds the first and
the last to models; the command line calls :func:`merge_adapter`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.inputs.live_model import LiveModelInput
from fastsave.log import shows_its_lines
from fastsave.options import parse_options
from fastsave.parallel.team import SaveTeam
from fastsave.pipeline.preflight import check_model, check_tokenizer, not_main_process
from fastsave.pipeline.run import run_save


@shows_its_lines
def save_pretrained_merged(
    model: nn.Module, save_directory: str | Path, tokenizer: Any = None, **options: Any
) -> str | None:
    """Save ``model`` as a LoRA adapter, a merged 16-bit checkpoint, or a merged 4-bit one.

    Args:
        model: a peft model (or a transformers model with a LoRA adapter), 4-bit, 8-bit or 16-bit.
        save_directory: the output directory; it receives the complete checkpoint in one step and
            keeps every file that is not part of a checkpoint of this kind.
        tokenizer: its files are saved beside the weights when given.
        **options: see docs/options.md: save_method, dtype, base_weights, max_shard_size,
            safe_serialization, maximum_memory_usage, temporary_location, push_to_hub, token,
            private, revision, commit_message, create_pr, is_main_process, adapter_names.

    Returns:
        The saved directory's path, or the hub URL when pushed; None on a process with
        ``is_main_process=False``, which returns before looking at anything else.

    Raises:
        TypeError: an unknown option, or a tokenizer that is not one. ValueError: an invalid
            option, a save_directory that cannot take this save, or a model that cannot be saved
            as asked. SaveInProgressError: another save into save_directory is running.
            DiskSpaceError: not enough room. In every case save_directory keeps what it held.
    """
    if not_main_process(model, options):
        return None
    opts = parse_options(save_directory, **options)
    check_model(model, opts)
    check_tokenizer(tokenizer)
    from fastsave.inputs.sharded_model import ShardedModelInput, is_sharded, lora_save_refused

    if is_sharded(model):
        # every rank holds part of every weight: every rank takes part, whatever is_main_process says
        if opts.save_method == "lora":
            raise lora_save_refused()  # before any work
        return run_save(ShardedModelInput(model, tokenizer), opts)
    return run_save(LiveModelInput(model, tokenizer), opts)


@shows_its_lines
def push_to_hub_merged(model: nn.Module, repo_id: str, tokenizer: Any = None, **options: Any) -> str | None:
    """Save ``model`` (``save_pretrained_merged``'s options) and upload it to the hub as ``repo_id``.

    ``use_temp_dir=True`` saves the local copy into a temporary directory that is removed after the
    upload; otherwise (None, as in Unsloth's merged push, or False) it stays in a local folder named
    after the repo (or ``save_directory=``). Returns the repo URL (the pull request's with
    ``create_pr=True``); None with ``is_main_process=False`` (nothing checked, saved or uploaded).
    ``low_disk_space_usage=True`` (Unsloth's keyword) uploads each shard as soon as it is written and
    deletes it, then commits every file at once (fastsave.pipeline.shard_upload): the local disk
    needs about two shards, not the model.
    """
    if not_main_process(model, options):
        return None
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a hub repo id such as 'user/model', got {repo_id!r}")
    use_temp_dir = options.pop("use_temp_dir", None)
    save_directory = options.pop("save_directory", None)
    if options.pop("low_disk_space_usage", False):  # Unsloth's keyword: shard by shard, one commit
        from fastsave.pipeline.shard_upload import push_shard_by_shard

        opts = parse_options(
            save_directory or Path(repo_id).name,
            **{**options, "push_to_hub": True, "repo_id": options.get("repo_id") or repo_id},
        )
        check_model(model, opts)
        check_tokenizer(tokenizer)
        if opts.save_method == "lora":
            raise ValueError(
                "low_disk_space_usage uploads a merged checkpoint's shards; an adapter is small: omit it"
            )
        return push_shard_by_shard(LiveModelInput(model, tokenizer), opts)
    options = {**options, "push_to_hub": True, "repo_id": options.get("repo_id") or repo_id}
    if use_temp_dir:
        with tempfile.TemporaryDirectory(prefix="fastsave-push-") as temporary:
            return save_pretrained_merged(model, Path(temporary) / Path(repo_id).name, tokenizer, **options)
    return save_pretrained_merged(model, save_directory or Path(repo_id).name, tokenizer, **options)


@shows_its_lines
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
    settings training used (fastsave.sources.settings_4bit.Quant4bitSettings; default: the QLoRA
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
