"""The options of ``save_pretrained_merged``: parsing and validation, before anything is written."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastsave.compressed_schemes import calibration_refusal
from fastsave.dtypes import SPELLINGS
from fastsave.save_methods import add_save_method, remove_save_method, save_methods  # noqa: F401 - re-exported

# Other spellings notebooks use (Unsloth's zoo accepts "forced_merged_4bit" for the forced 4-bit save).
# Methods are also matched case-insensitively, with spaces and hyphens read as underscores.
SAVE_METHOD_ALIASES = {"forced_merged_4bit": "merged_4bit_forced"}
BASE_WEIGHTS = ("dequantized", "original")

# Keywords of Unsloth's save_pretrained_merged / push_to_hub_merged / save_pretrained_gguf that mean
# nothing here. They are accepted, so that notebooks written for Unsloth run unchanged, and named in
# one warning per call. Each value says why it has no effect.
NO_EFFECT_OPTIONS = {
    "save_function": "fastsave streams safetensors itself (torch .bin shards with safe_serialization=False)",
    "calibration_dataset": "only Unsloth's FP8/FP4 compressed exports use calibration data",
    "num_calibration_samples": "only Unsloth's FP8/FP4 compressed exports use calibration data",
    "max_seq_length": "only Unsloth's FP8/FP4 compressed exports use calibration data",
    "install_missing_dependencies": "fastsave never installs anything at run time",
    "merge_is_disposable": "the temporary 16-bit checkpoint of a GGUF export is always removed",
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
    # True: when the disk cannot hold the previous and the new checkpoint together, delete the
    # previous one's files before writing (never done without this option)
    replace_in_place: bool = False
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
    # Keywords shared with transformers' save_pretrained / push_to_hub (Unsloth passes them through).
    variant: str | None = None  # weight files named model.<variant>.safetensors, as transformers names them
    save_peft_format: bool = True  # False: adapter tensor names without the "base_model.model." prefix
    # lora: peft's save_pretrained keyword: the embedding layers saved with the adapter (True, False,
    # or "auto": when the vocabulary was resized or the embeddings are targeted)
    save_embedding_layers: bool | str = "auto"
    tags: tuple[str, ...] = ()  # model card tags
    datasets: tuple[str, ...] = ()  # model card datasets
    commit_description: str | None = None  # hub commit description
    use_temp_dir: bool | None = None  # push_to_hub_*: stage the local copy in a temporary directory
    # Tensors to write instead of computing them (save_pretrained's state_dict); see fastsave.plan.given_tensors.
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


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
    """Accept None, torch.float16/bfloat16/float32 or their names; anything else is a ValueError.

    float32 writes a float32 checkpoint: the float32 merge itself, with no rounding at all.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in (torch.float16, torch.bfloat16, torch.float32):
            return value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in SPELLINGS:
        return SPELLINGS[value.lower().removeprefix("torch.")]
    raise ValueError(
        f"dtype={value!r} is not supported: merged weights are saved as torch.float16, torch.bfloat16 "
        "or torch.float32 (or None to keep the 16-bit dtype the model computes in)"
    )


def normalize_save_method(value: Any) -> str:
    """A save method as fastsave names it: case-insensitive, spaces/hyphens as underscores, aliases resolved.

    Raises:
        ValueError: ``merged_4bit`` (refused, with the reason) or a method fastsave does not know.
    """
    if not isinstance(value, str):
        raise ValueError(f"save_method must be a string such as 'merged_16bit', got {value!r}")
    method = re.sub(r"[\s\-]+", "_", value.strip().lower())
    method = SAVE_METHOD_ALIASES.get(method, method)
    if method == "merged_4bit":
        raise ValueError(
            "save_method='merged_4bit' is refused: merging a LoRA into 4-bit weights re-quantizes them, "
            "which loses most of what the adapter learned (the delta is usually smaller than one NF4 "
            "step). Save 'merged_16bit' for inference and GGUF conversion, or 'lora' to keep the adapter; "
            "if you really want a 4-bit merged checkpoint, ask for it with save_method='merged_4bit_forced'."
        )
    needs_data = calibration_refusal(method)
    if needs_data is not None:
        raise ValueError(needs_data)
    if method not in save_methods():
        raise ValueError(
            f"save_method={value!r} is unknown: use one of {', '.join(map(repr, save_methods()))}"
        )
    return method


def _string_list(name: str, value: Any) -> tuple[str, ...]:
    """tags / datasets: one string or a list of strings (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
    return tuple(dict.fromkeys(value))


def _parse_variant(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*", value):
        raise ValueError(
            f"variant={value!r} must be a short name such as 'fp16' (letters, digits, '_', '.', '-'): "
            "it becomes part of the weight file names (model.<variant>.safetensors)"
        )
    return value


def _parse_state_dict(value: Any) -> Mapping[str, torch.Tensor] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise ValueError(
            "state_dict must be a dict of tensor name -> torch.Tensor (as model.state_dict() gives)"
        )
    return value


def no_effect_options(kwargs: Mapping[str, Any], save_method: str, purpose: str = "save") -> list[str]:
    """The given keywords that change nothing for this save, in the order given.

    Unsloth's keywords without a meaning here, plus those whose meaning belongs to another kind of
    save: ``variant`` names merged weight files (an adapter is always adapter_model.safetensors),
    ``save_peft_format`` names adapter tensors, and a GGUF export's temporary checkpoint has no
    file names, shards or serialization format a user sees.
    """
    # A keyword left at its default (None for Unsloth's own) asks for nothing, so it is not named.
    given = [name for name, value in kwargs.items() if value is not None and not _is_default(name, value)]
    ignored = set(NO_EFFECT_OPTIONS) | {"use_temp_dir"}  # push_to_hub_merged/_gguf consume use_temp_dir
    ignored |= {"variant"} if save_method == "lora" else {"save_peft_format", "save_embedding_layers"}
    if purpose == "gguf":
        ignored |= {"variant", "max_shard_size", "safe_serialization", "save_peft_format"}
    return [name for name in given if name in ignored]


def _is_default(name: str, value: Any) -> bool:
    """Whether ``value`` asks for the default of option ``name`` ("5GB" is max_shard_size's default)."""
    if name == "max_shard_size" and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return parse_shard_size(value) == _DEFAULTS["max_shard_size"]
        except ValueError:
            return False
    return value == _DEFAULTS.get(name)


def warn_no_effect(names: list[str], purpose: str = "save") -> None:
    """One warning naming every keyword that has no effect on this save."""
    if not names:
        return
    reasons = "; ".join(f"{n}: {NO_EFFECT_OPTIONS.get(n, _CONDITIONAL_REASONS.get(n, ''))}" for n in names)
    what = "this GGUF export" if purpose == "gguf" else "this save"
    warnings.warn(
        f"fastsave: {', '.join(names)} {'has' if len(names) == 1 else 'have'} no effect on {what} "
        f"(accepted for compatibility with Unsloth notebooks). {reasons}",
        UserWarning,
        stacklevel=4,
    )


_CONDITIONAL_REASONS = {
    "variant": "it names merged weight files; an adapter is written as adapter_model.safetensors, and a "
    "GGUF export's 16-bit checkpoint is temporary",
    "save_peft_format": "it names adapter tensors, and this save writes no adapter",
    "save_embedding_layers": "it chooses what an adapter save holds, and this save writes no adapter",
    "max_shard_size": "the 16-bit checkpoint of a GGUF export is temporary",
    "safe_serialization": "the 16-bit checkpoint of a GGUF export is temporary",
    "use_temp_dir": "only push_to_hub_merged and push_to_hub_gguf choose where their local copy goes",
}


def parse_options(save_directory: str | Path, **kwargs: Any) -> SaveOptions:
    """Validate every save option; raise before anything is written.

    A None value means the option's default (Unsloth's ``safe_serialization=None``,
    ``max_shard_size=None``, ...). Keywords of Unsloth's that mean nothing here are accepted and
    named in one warning (:data:`NO_EFFECT_OPTIONS`).

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: a value that is out of range or unsupported, with what to do instead.
    """
    return _parse(save_directory, kwargs, "save")


def parse_gguf_options(save_directory: str | Path, **kwargs: Any) -> SaveOptions:
    """:func:`parse_options` for a GGUF export: the same options, save_method always merged_16bit.

    The options that only shape the temporary 16-bit checkpoint's files (variant, max_shard_size,
    safe_serialization) are accepted and named in the one warning.
    """
    return _parse(save_directory, kwargs, "gguf")


_DEFAULTS = {
    name: f.default for name, f in SaveOptions.__dataclass_fields__.items() if name != "save_directory"
}


def _parse(save_directory: str | Path, kwargs: dict[str, Any], purpose: str) -> SaveOptions:
    if "selected_adapters" in kwargs:  # peft's save_pretrained name for adapter_names
        kwargs = dict(kwargs)
        selected = kwargs.pop("selected_adapters")
        if (
            kwargs.get("adapter_names") is not None
            and selected is not None
            and list(selected) != list(kwargs["adapter_names"])
        ):
            raise ValueError(
                f"selected_adapters={selected!r} and adapter_names={kwargs['adapter_names']!r} disagree: give one"
            )
        if selected is not None:
            kwargs["adapter_names"] = selected
    known = set(SaveOptions.__dataclass_fields__) - {"save_directory"}
    unknown = sorted(set(kwargs) - known - set(NO_EFFECT_OPTIONS))
    if unknown:
        raise TypeError(
            f"save_pretrained_merged() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(known))}"
        )
    if save_directory is None or str(save_directory) == "":
        raise ValueError("save_directory must be a directory path (or a hub repo id with push_to_hub=True)")
    path = Path(save_directory).expanduser()
    if os.path.exists(path) and not os.path.isdir(path):  # (os.path: a too-long name is not an error here)
        raise ValueError(
            f"save_directory {str(path)!r} exists and is a file, not a directory: choose another path"
        )

    # None means the default, as in Unsloth (safe_serialization=None, max_shard_size=None, ...).
    given = kwargs
    kwargs = {
        k: v
        for k, v in kwargs.items()
        if k not in NO_EFFECT_OPTIONS and not (v is None and _DEFAULTS.get(k) is not None)
    }
    method = normalize_save_method(kwargs.get("save_method", _DEFAULTS["save_method"]))
    if purpose == "gguf" and method != "merged_16bit":
        raise ValueError(
            f"save_method={kwargs['save_method']!r} cannot be exported to GGUF here: a GGUF export merges "
            "into a 16-bit checkpoint first (save_method=None or 'merged_16bit'). For a LoRA adapter "
            "GGUF, save the adapter with save_method='lora' and run llama.cpp's convert_lora_to_gguf.py."
        )
    if kwargs.get("state_dict") is not None and method == "merged_4bit_forced":
        raise ValueError(
            "state_dict is not supported with save_method='merged_4bit_forced': give it to a "
            "'merged_16bit' save (tensors taken from it) or a 'lora' save (adapter tensors taken from it)"
        )

    base_weights = kwargs.get("base_weights", _DEFAULTS["base_weights"])
    if base_weights not in BASE_WEIGHTS:
        raise ValueError(
            f"base_weights={base_weights!r} is unknown: use 'dequantized' (merge into the NF4 weights the "
            "adapter was trained against) or 'original' (merge into the 16-bit base checkpoint on disk)"
        )

    fraction = kwargs.get("maximum_memory_usage", _DEFAULTS["maximum_memory_usage"])
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.95:
        raise ValueError(
            f"maximum_memory_usage={fraction!r} must be a fraction of system RAM with 0 < x <= 0.95 "
            "(for example 0.5 for half of the RAM)"
        )

    temporary_location = kwargs.get("temporary_location")
    if temporary_location is not None:
        # Relative paths (notebooks pass "_unsloth_temporary_saved_buffers") are fixed against the
        # working directory now, so a chdir during the save cannot move them.
        temporary_location = Path(temporary_location).expanduser().absolute()
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

    for flag in (
        "push_to_hub",
        "safe_serialization",
        "is_main_process",
        "create_pr",
        "save_peft_format",
        "replace_in_place",
    ):
        if flag in kwargs and not isinstance(kwargs[flag], bool):
            raise ValueError(f"{flag} must be True or False, got {kwargs[flag]!r}")
    layers = kwargs.get("save_embedding_layers", "auto")
    if not (isinstance(layers, bool) or layers == "auto"):
        raise ValueError(
            f"save_embedding_layers must be True, False or 'auto' (peft's meaning), got {layers!r}"
        )
    if kwargs.get("use_temp_dir") is not None and not isinstance(kwargs["use_temp_dir"], bool):
        raise ValueError(f"use_temp_dir must be True, False or None, got {kwargs['use_temp_dir']!r}")
    for text in ("commit_message", "commit_description", "revision", "repo_id"):
        if kwargs.get(text) is not None and not isinstance(kwargs[text], str):
            raise ValueError(f"{text} must be a string, got {kwargs[text]!r}")

    warn_no_effect(no_effect_options(given, method, purpose), purpose)

    return SaveOptions(
        save_directory=path,
        save_method=method,
        dtype=parse_dtype(kwargs.get("dtype")),
        base_weights=base_weights,
        max_shard_size=parse_shard_size(kwargs.get("max_shard_size", _DEFAULTS["max_shard_size"])),
        safe_serialization=kwargs.get("safe_serialization", _DEFAULTS["safe_serialization"]),
        maximum_memory_usage=float(fraction),
        temporary_location=temporary_location,
        replace_in_place=kwargs.get("replace_in_place", _DEFAULTS["replace_in_place"]),
        push_to_hub=kwargs.get("push_to_hub", _DEFAULTS["push_to_hub"]),
        repo_id=kwargs.get("repo_id"),
        token=kwargs.get("token"),
        private=kwargs.get("private"),
        revision=kwargs.get("revision"),
        commit_message=kwargs.get("commit_message"),
        create_pr=kwargs.get("create_pr", _DEFAULTS["create_pr"]),
        is_main_process=kwargs.get("is_main_process", _DEFAULTS["is_main_process"]),
        adapter_names=adapter_names,
        original_base_path=kwargs.get("original_base_path"),
        variant=_parse_variant(kwargs.get("variant")),
        save_peft_format=kwargs.get("save_peft_format", _DEFAULTS["save_peft_format"]),
        save_embedding_layers=layers,
        tags=_string_list("tags", kwargs.get("tags")),
        datasets=_string_list("datasets", kwargs.get("datasets")),
        commit_description=kwargs.get("commit_description"),
        use_temp_dir=kwargs.get("use_temp_dir"),
        state_dict=_parse_state_dict(kwargs.get("state_dict")),
    )
