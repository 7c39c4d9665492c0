"""Upload a saved directory to the Hugging Face Hub (``push_to_hub=True``).

The token is handed to ``huggingface_hub.HfApi`` and to nothing else: it is never logged, printed
or written to a file (the options object hides it from its repr too).
"""

from __future__ import annotations

import logging
from typing import Any

from fastsave.options import SaveOptions

logger = logging.getLogger(__name__)


def prepare_repo(api: Any, repo_id: str, opts: SaveOptions) -> tuple[Any, str]:
    """Create the repo when missing (and the ``revision`` branch); the repo URL and the hub's own
    spelling of the repo id (the user namespace added)."""
    repo_url = api.create_repo(repo_id=repo_id, private=opts.private, exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if opts.revision is not None:
        api.create_branch(repo_id=repo_id, branch=opts.revision, exist_ok=True)
    return repo_url, repo_id


def upload_directory(opts: SaveOptions) -> str:
    """Create the repo if needed and upload ``opts.save_directory`` to it; return the URL.

    The repo id is ``opts.repo_id``, else ``save_directory`` as given. With ``revision`` the branch is
    created when missing; with ``create_pr`` the upload opens a pull request and its URL is returned.

    Raises:
        ValueError: no repo id can be derived.
        Whatever huggingface_hub raises for an upload that fails (authentication, network, ...).
    """
    from huggingface_hub import HfApi

    repo_id = opts.repo_id or str(opts.save_directory)
    if not repo_id or repo_id in (".", "/"):
        raise ValueError("push_to_hub needs a repo id: pass repo_id='user/name'")
    api = HfApi(token=opts.token)
    repo_url, repo_id = prepare_repo(api, repo_id, opts)
    logger.info("fastsave: uploading %s to the hub as %s", opts.save_directory, repo_id)
    extra = {"commit_description": opts.commit_description} if opts.commit_description is not None else {}
    commit = api.upload_folder(
        folder_path=str(opts.save_directory),
        repo_id=repo_id,
        revision=opts.revision,
        commit_message=opts.commit_message or "Upload model saved with fastsave",
        create_pr=opts.create_pr,
        **extra,
    )
    pr_url = getattr(commit, "pr_url", None)
    url = str(pr_url) if opts.create_pr and pr_url else str(repo_url)
    logger.info("fastsave: uploaded to %s", url)
    return url
