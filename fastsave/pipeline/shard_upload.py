"""``push_to_hub_merged(..., low_disk_space_usage=True)``: a merged save uploaded shard by shard.

The one save path's plan and writer, into a temporary directory; each shard leaves for the hub as
soon as it is complete, and one commit at the end publishes every file (see
:func:`push_shard_by_shard`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastsave.formats import quantization_config_of
from fastsave.options import SaveOptions

logger = logging.getLogger(__name__)


def push_shard_by_shard(save_input: Any, opts: SaveOptions) -> str:
    """``push_to_hub_merged(..., low_disk_space_usage=True)``: upload each shard as soon as it is
    finished and read back, then delete it; one commit at the end with every file.

    The shards go through huggingface_hub's pre-upload of LFS files (stored by the hub, not yet in
    the repo); config, tokenizer, index and model card are written after the last shard; one
    ``create_commit`` then adds them all, so the repo never shows half a model, and a failure
    before that commit leaves its files as they were (a missing repo is created empty first: the
    pre-upload needs it). The local disk holds at most the shard being written and the one being
    uploaded; shards small enough for the hub to take as regular files stay until the commit.

    Returns:
        The repo URL (the pull request's with ``create_pr``).

    Raises:
        Whatever the merge or huggingface_hub raises; nothing is committed then.
    """
    import tempfile
    from dataclasses import replace

    from huggingface_hub import CommitOperationAdd, HfApi

    from fastsave.hub import prepare_repo
    from fastsave.io.format import read_safetensors_header
    from fastsave.io.model_card import write_model_card
    from fastsave.pipeline.run import output_plan
    from fastsave.pipeline.write import write_merged_weights

    repo_id = opts.repo_id or opts.save_directory.name
    api = HfApi(token=opts.token)
    repo_url, repo_id = prepare_repo(api, repo_id, opts)
    operations: list[Any] = []

    def upload(path: Path) -> None:
        if path.suffix == ".safetensors":
            header = read_safetensors_header(path)  # the shard reads back before it leaves
            end = max(
                (int(e["data_offsets"][1]) for k, e in header.items() if not k.startswith("__")), default=0
            )
            if path.stat().st_size != header["__header_bytes__"] + end:
                raise OSError(f"{path.name} does not read back as written; nothing was committed")
        operation = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        api.preupload_lfs_files(
            repo_id, additions=[operation], revision=opts.revision, create_pr=opts.create_pr
        )
        operations.append(operation)
        if getattr(operation, "_is_uploaded", False):
            path.unlink()  # on the hub now; the commit needs only its hash
        logger.info("fastsave: %s uploaded to %s (not yet committed)", path.name, repo_id)

    with tempfile.TemporaryDirectory(prefix="fastsave-upload-", dir=opts.temporary_location) as temporary:
        directory = Path(temporary) / Path(repo_id).name  # the name the model card shows
        directory.mkdir()
        local = replace(opts, save_directory=directory, push_to_hub=False)
        plan = output_plan(save_input, local)
        write_merged_weights(plan, directory, local, on_shard_done=upload)
        save_input.write_files(
            directory, plan, local, quantization_config_of(local.save_method, save_input, plan)
        )
        if getattr(save_input, "model", None) is not None:
            write_model_card(save_input.model, local, directory, plan.dtype)
        uploaded = {operation.path_in_repo for operation in operations}
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name not in uploaded:
                operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)))
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=opts.commit_message or "Upload model saved with fastsave",
            commit_description=opts.commit_description,
            revision=opts.revision,
            create_pr=opts.create_pr,
        )
    pr_url = getattr(commit, "pr_url", None)
    url = str(pr_url) if opts.create_pr and pr_url else str(repo_url)
    logger.info("fastsave: %d files committed to %s in one commit", len(operations), url)
    return url
