"""Attach fastsave's methods to one model instance, or to the peft/transformers classes."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.save import save_pretrained_merged

_METHOD_NAMES = ("save_pretrained_merged", "push_to_hub_merged")
_class_originals: dict[tuple[type, str], Any] = {}
_MISSING = object()


def _save_method(self: nn.Module, save_directory: str | Path, tokenizer: Any = None, **options: Any) -> str:
    """Save this model merged (or as an adapter): see ``fastsave.save_pretrained_merged``."""
    return save_pretrained_merged(self, save_directory, tokenizer, **options)


def _push_method(self: nn.Module, repo_id: str, tokenizer: Any = None, **options: Any) -> str:
    """Save this model merged into a local folder named after ``repo_id``, then upload it to the hub."""
    options.setdefault("repo_id", repo_id)
    options["push_to_hub"] = True
    save_directory = options.pop("save_directory", None) or Path(repo_id).name
    return save_pretrained_merged(self, save_directory, tokenizer, **options)


_save_method.__name__ = "save_pretrained_merged"
_push_method.__name__ = "push_to_hub_merged"
_FUNCTIONS = {"save_pretrained_merged": _save_method, "push_to_hub_merged": _push_method}


def patch(model: nn.Module | None = None) -> nn.Module | None:
    """Give ``model`` (or, with no argument, every peft and transformers model) fastsave's methods.

    Adds ``save_pretrained_merged`` and ``push_to_hub_merged`` as bound methods. Idempotent; the
    model computes exactly what it did before. Another library's method of the same name is
    replaced, since fastsave's was asked for. Returns the model (None for the class patch).
    """
    if model is None:
        for cls in _patchable_classes():
            for name in _METHOD_NAMES:
                if (cls, name) not in _class_originals:
                    _class_originals[(cls, name)] = cls.__dict__.get(name, _MISSING)
                setattr(cls, name, _FUNCTIONS[name])
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastsave.patch expects a torch.nn.Module, got {type(model).__name__}")
    for name in _METHOD_NAMES:
        setattr(model, name, types.MethodType(_FUNCTIONS[name], model))
    return model


def unpatch() -> None:
    """Undo ``patch()`` with no argument: restore the classes' own attributes (instances keep theirs)."""
    for (cls, name), original in list(_class_originals.items()):
        if original is _MISSING:
            if name in cls.__dict__:
                delattr(cls, name)
        else:
            setattr(cls, name, original)
        del _class_originals[(cls, name)]


def _patchable_classes() -> list[type]:
    classes = []
    try:
        from peft import PeftModel

        classes.append(PeftModel)
    except ImportError:  # pragma: no cover
        pass
    from transformers import PreTrainedModel

    classes.append(PreTrainedModel)
    return classes
