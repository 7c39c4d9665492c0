"""The options of ``save_pretrained_merged``: parsing and validation, before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit_forced")
BASE_WEIGHTS = ("dequantized", "original")
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class SaveOptions:
    """Every option of a save, validated. Built only by :func:`parse_options`."""

    save_directory: Path
    save_method: str = "merged_16bit"
    dtype: torch.dtype | None = None
    base_weights: str = "dequantized"
    max_shard_size: int = 5 * 10**9
    safe_serialization: bool = True
    maximum_memory_usage: float = 0.75
    temporary_location: Path | None = None
    push_to_hub: bool = False
    repo_id: str | None = None
    token: str | None = field(default=None, repr=False)  # never printed
    private: bool | None = None
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    is_main_process: bool = True
    adapter_names: tuple[str, ...] | None = None
    original_base_path: str | None = None


def parse_shard_size(value: int | str) -> int:
    """Turn ``5GB``, ``500MB``, ``2GiB`` or an int of bytes into bytes, like transformers does.

    Raises:
        ValueError: the value is not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"max_shard_size must be an int of bytes or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"max_shard_size must be positive, got {value}")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", value.upper())
        if match:
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
            if size > 0:
                return size
        if value.strip().isdigit() and int(value) > 0:
            return int(value)
    raise ValueError(
        f"max_shard_size={value!r} is not a size: give an int of bytes or a string such as "
        "'500MB', '5GB' or '2GiB'"
    )


def parse_dtype(value: Any) -> torch.dtype | None:
    """Accept None, torch.float16/bfloat16 or their names; anything else is a ValueError."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in (torch.float16, torch.bfloat16, torch.float32):
            return value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.lower().removeprefix("torch.")]
    raise ValueError(
        f"dtype={value!r} is not supported: merged weights are saved as torch.float16, torch.bfloat16 "
        "or torch.float32 (or None to keep the 16-bit dtype the model computes in)"
    )


def parse_options(save_directory: str | Path, **kwargs: Any) -> SaveOptions:
    """Validate every save option; raise before anything is written.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: a value that is out of range or unsupported, with what to do instead.
    """
    known = set(SaveOptions.__dataclass_fields__) - {"save_directory"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"save_pretrained_merged() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(known))}"
        )
    if save_directory is None or str(save_directory) == "":
        raise ValueError("save_directory must be a directory path (or a hub repo id with push_to_hub=True)")
    path = Path(save_directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"save_directory {str(path)!r} exists and is a file, not a directory: choose another path"
        )

    method = kwargs.get("save_method", "merged_16bit")
    if method == "merged_4bit":
        raise ValueError(
            "save_method='merged_4bit' is refused: merging a LoRA into 4-bit weights re-quantizes them, "
            "which loses most of what the adapter learned (the delta is usually smaller than one NF4 "
            "step). Save 'merged_16bit' for inference and GGUF conversion, or 'lora' to keep the adapter; "
            "if you really want a 4-bit merged checkpoint, ask for it with save_method='merged_4bit_forced'."
        )
    if method not in SAVE_METHODS:
        raise ValueError(
            f"save_method={method!r} is unknown: use one of {', '.join(map(repr, SAVE_METHODS))}"
        )

    base_weights = kwargs.get("base_weights", "dequantized")
    if base_weights not in BASE_WEIGHTS:
        raise ValueError(
            f"base_weights={base_weights!r} is unknown: use 'dequantized' (merge into the NF4 weights the "
            "adapter was trained against) or 'original' (merge into the 16-bit base checkpoint on disk)"
        )

    fraction = kwargs.get("maximum_memory_usage", 0.75)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.95:
        raise ValueError(
            f"maximum_memory_usage={fraction!r} must be a fraction of system RAM with 0 < x <= 0.95 "
            "(for example 0.5 for half of the RAM)"
        )

    temporary_location = kwargs.get("temporary_location")
    if temporary_location is not None:
        temporary_location = Path(temporary_location).expanduser()
        if temporary_location.exists() and not temporary_location.is_dir():
            raise ValueError(f"temporary_location {str(temporary_location)!r} is a file, not a directory")

    adapter_names = kwargs.get("adapter_names")
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        adapter_names = tuple(adapter_names)
        if not adapter_names or not all(isinstance(a, str) for a in adapter_names):
            raise ValueError(
                f"adapter_names must be a non-empty list of adapter names, got {adapter_names!r}"
            )

    for flag in ("push_to_hub", "safe_serialization", "is_main_process", "create_pr"):
        if flag in kwargs and not isinstance(kwargs[flag], bool):
            raise ValueError(f"{flag} must be True or False, got {kwargs[flag]!r}")

    return SaveOptions(
        save_directory=path,
        save_method=method,
        dtype=parse_dtype(kwargs.get("dtype")),
        base_weights=base_weights,
        max_shard_size=parse_shard_size(kwargs.get("max_shard_size", "5GB")),
        safe_serialization=kwargs.get("safe_serialization", True),
        maximum_memory_usage=float(fraction),
        temporary_location=temporary_location,
        push_to_hub=kwargs.get("push_to_hub", False),
        repo_id=kwargs.get("repo_id"),
        token=kwargs.get("token"),
        private=kwargs.get("private"),
        revision=kwargs.get("revision"),
        commit_message=kwargs.get("commit_message"),
        create_pr=kwargs.get("create_pr", False),
        is_main_process=kwargs.get("is_main_process", True),
        adapter_names=adapter_names,
        original_base_path=kwargs.get("original_base_path"),
    )
