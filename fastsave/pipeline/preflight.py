"""Before any merge: the model, the tokenizer and save_directory are checked, and a staging
directory is made where the save writes (fastsave.io.staging)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.errors import DiskSpaceError, PlanError
from fastsave.io.disk_space import FULL_DISK_ERRNOS
from fastsave.io.staging import PendingSave
from fastsave.options import SaveOptions
from fastsave.plan.walk import unwrap_peft

logger = logging.getLogger(__name__)


class Preflight:
    """The checks before a save into ``options.save_directory``, and the staging directory it writes into.

    As a context manager it enters to the directory to write into. On entry, before any merge:
    save_directory is checked (a file, a dangling symlink, a name too long, no permission, a
    checkpoint of the other kind: refused), its lock is taken (a second save into it fails at
    once), an interrupted earlier save is completed or rolled back, staging directories of dead
    saves are removed, and a fresh staging directory is made. :attr:`pending` is then the pending
    save (fastsave.io.staging): check its disk space once the plan is known, publish it when the
    files are written. On exit, whatever the save created and did not publish is removed and the
    lock released: on success, error or Ctrl-C.

    ``kind``: what the save writes (fastsave.io.ownership: ADAPTER, MERGED, GGUF); None: from
    ``options.save_method``.

    Raises:
        TargetError, MixedKindsError (ValueError): save_directory cannot take this save.
        SaveInProgressError: another save into save_directory is running.
        DiskSpaceError: the disk filled up (ENOSPC) while writing: nothing was published.
    """

    def __init__(self, options: SaveOptions, kind: str | None = None) -> None:
        self.options = options
        self.kind = kind
        self.pending: PendingSave | None = None  # once entered (on the rank that publishes)

    def __enter__(self) -> Path:
        options = self.options
        self.pending = PendingSave(
            options.save_directory,
            options.save_method,
            options.temporary_location,
            options.replace_in_place,
            kind=self.kind,
            variant=options.variant,
        )
        try:
            return self.pending.prepare()
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> bool:
        try:
            if (
                isinstance(error, OSError)
                and error.errno in FULL_DISK_ERRNOS
                and not isinstance(error, DiskSpaceError)
            ):
                raise DiskSpaceError(
                    f"the disk filled up while saving to {self.options.save_directory} ({error}). Nothing was "
                    "published: the directory keeps its previous contents. Free space, or save to another disk."
                ) from error
        finally:
            if self.pending is not None:
                self.pending.close()
        return False


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


def not_main_process(model: Any, options: dict[str, Any]) -> bool:
    """True when this call runs on a rank that must do nothing (``is_main_process=False``), decided
    before any option is validated: every rank but one in a multi-process script returns at once.
    A model sharded by FSDP or ZeRO-3 is the exception: every rank holds part of every weight, so
    every rank takes part in its (collective) save whatever is_main_process says."""
    if options.get("is_main_process", True) is not False:
        return False
    from fastsave.inputs.sharded_model import is_sharded

    if isinstance(model, nn.Module) and is_sharded(model):
        return False
    logger.debug("fastsave: is_main_process=False: this process saves nothing")
    return True


def check_model(model: nn.Module, options: SaveOptions) -> None:
    """Refuse, before any work, something that is not a transformers model (or a peft model over one).

    Raises:
        TypeError: ``model`` is not a torch module. ValueError: it has no transformers config.
        PlanError: ``save_method="lora"`` on a model that holds no adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a peft or transformers model), got {type(model).__name__}"
        )
    if getattr(unwrap_peft(model), "config", None) is None and options.save_method != "lora":
        raise ValueError("model has no transformers config; fastsave saves transformers models")
    if options.save_method == "lora" and not hasattr(model, "peft_config"):
        raise PlanError(
            "save_method='lora' saves an adapter, and this model has none (no peft adapter attached or "
            "loaded): save it with save_method='merged_16bit', or attach the adapter first. Nothing was written."
        )
