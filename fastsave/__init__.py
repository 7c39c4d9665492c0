"""fastsave: save QLoRA-trained models as adapters, merged 16-bit or merged 4-bit checkpoints.

import fastsave
fastsave.patch(model)
model.save_pretrained_merged("out", tokenizer, save_method="merged_16bit")

The names below are imported when first used (PEP 562), so that ``import fastsave.cli`` (the
command's start: ``fastsave --help``, ``fastsave verify``) does not import torch, transformers, peft
or bitsandbytes.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastsave._version import __version__ as __version__

_WHERE = {
    "save_pretrained_merged": "fastsave.api",
    "DiskSpaceError": "fastsave.errors",
    "FastsaveError": "fastsave.errors",
    "PlanError": "fastsave.errors",
    "push_to_hub_gguf": "fastsave.export",
    "save_pretrained_gguf": "fastsave.export",
    "patch": "fastsave.patching",
    "unpatch": "fastsave.patching",
}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    """The public names, imported on first use."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastsave' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
