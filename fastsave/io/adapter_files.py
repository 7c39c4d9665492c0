"""``save_peft_format=False``: adapter tensors named without peft's ``base_model.model.`` prefix.

transformers' ``save_pretrained(save_peft_format=...)`` defines it: by default the tensors of an
adapter are named as peft names them (``base_model.model.model.layers.0...lora_A.weight``);
``False`` drops the ``base_model.model.`` prefix. transformers' ``load_adapter`` reads both. The
adapter is written by peft first, then its weight files in the staging directory are rewritten.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "base_model.model."


def apply_save_peft_format(directory: Path, save_peft_format: bool) -> int:
    """Drop the prefix from every adapter weight file under ``directory`` when asked; return files rewritten."""
    if save_peft_format:
        return 0
    rewritten = 0
    for path in sorted(directory.rglob("adapter_model.safetensors")):
        tensors = load_file(path)
        save_file({k.removeprefix(_PREFIX): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
        rewritten += 1
    for path in sorted(directory.rglob("adapter_model.bin")):
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({k.removeprefix(_PREFIX): v for k, v in tensors.items()}, path)
        rewritten += 1
    return rewritten
