"""Disk space of a GGUF export, checked before the merge: the GGUF files (and a 16-bit checkpoint).

Fed straight from the merge (fastsave.export.feed), the export holds the first GGUF, then, for
llama-quantize types, the first GGUF plus the quantized ones (the first removed at the end unless
asked for). On the checkpoint route it holds at its peak the temporary 16-bit checkpoint plus
the first GGUF (the converter reads one while writing the other); the checkpoint is removed before
llama-quantize runs. Sizes come from the model's logical parameter
count (4-bit weights counted unpacked), times the bytes per weight of each file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fastsave.errors import DiskSpaceError
from fastsave.export.methods import bits_per_weight

_MARGIN_FRACTION = 0.02  # headers, tokenizer, config, filesystem blocks, norms kept in float32
_MARGIN_BYTES = 64 * 2**20


def logical_parameter_count(model: nn.Module) -> int:
    """Weights the merged checkpoint holds: every parameter once, 4-bit ones unpacked, LoRA ones not."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    total = 0
    for name, parameter in inner.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(parameter, "quant_state", None)
        shape = getattr(state, "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else parameter.numel()
    return total


def _existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def check_export_space(
    n_weights: int,
    checkpoint_bytes_per_weight: int,
    first: str,
    outputs: list[str],
    work: Path,
    save_directory: Path,
) -> dict[str, int]:
    """Raise DiskSpaceError unless both the checkpoint and the GGUF files fit; return the estimates.

    ``work`` is where the checkpoint and the GGUF files are made, ``save_directory`` where the GGUF
    files end up (a rename on the same filesystem, a copy onto another one).
    """
    checkpoint = n_weights * checkpoint_bytes_per_weight
    first_bytes = n_weights * bits_per_weight(first) / 8
    quantized = sum(n_weights * bits_per_weight(m) / 8 for m in outputs if m != first)
    kept = sum(n_weights * bits_per_weight(m) / 8 for m in outputs)
    peak = max(checkpoint + first_bytes, first_bytes + quantized)
    need = int(peak * (1 + _MARGIN_FRACTION)) + _MARGIN_BYTES
    where = _existing(work)
    free = shutil.disk_usage(where).free
    if free < need:
        raise DiskSpaceError(
            f"not enough disk space for the GGUF export: it needs about {_gb(need)} in {where} ("
            + (f"the temporary 16-bit checkpoint, {_gb(checkpoint)}, and " if checkpoint else "")
            + f"the GGUF file(s), {_gb(first_bytes + quantized)}),"
            f" and {_gb(free)} is free. Free space there, pass temporary_location= a directory on a disk "
            "with room, or save to another disk. Nothing was written."
        )
    destination = _existing(save_directory)
    if os.stat(destination).st_dev != os.stat(where).st_dev:
        need_there = int(kept * (1 + _MARGIN_FRACTION)) + _MARGIN_BYTES
        free_there = shutil.disk_usage(destination).free
        if free_there < need_there:
            raise DiskSpaceError(
                f"not enough disk space for the GGUF file(s): they need about {_gb(need_there)} in "
                f"{destination}, and {_gb(free_there)} is free. Nothing was written."
            )
    return {"checkpoint": int(checkpoint), "gguf": int(kept), "peak": need}
