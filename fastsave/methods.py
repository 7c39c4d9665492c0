"""The methods ``fastsave.patch`` gives a model, with the signatures of Unsloth's methods of the same
names (Unsloth 2026.10.9): the same parameters in the same order, the same defaults, the same
return values, so that a notebook written for Unsloth runs unchanged, positional calls included.

Each method hands its arguments to the one save path (fastsave.api, fastsave.export); fastsave's
own options (``dtype``, ``base_weights``, ``adapter_names``, ``replace_in_place``, ``llama_cpp``...)
are keywords after Unsloth's. The defaults are Unsloth's, commit messages included; the one read
differently is ``temporary_location``'s default, Unsloth's buffer folder in the working directory:
it means "no choice", and fastsave stages beside the output (one atomic switch, nothing left in
the working directory). Unsloth's keywords that mean nothing here (``save_function``, the calibration settings,
``install_missing_dependencies``, ``merge_is_disposable``) are accepted; given a value of their
own, one warning names them (fastsave.options.NO_EFFECT_OPTIONS).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

UNSLOTH_BUFFERS = "_unsloth_temporary_saved_buffers"  # Unsloth's default temporary_location
UNSLOTH_COMMIT_MESSAGE = "Trained with Unsloth"
UNSLOTH_COMMIT_DESCRIPTION = "Upload model trained with Unsloth 2x faster"
# Unsloth-only keywords and their defaults: passed on (and named in the no-effect warning) only
# when the caller gave another value
_UNSLOTH_ONLY = {
    "save_function": torch.save,
    "calibration_dataset": None,
    "num_calibration_samples": 512,
    "max_seq_length": 2048,
    "install_missing_dependencies": True,
    "merge_is_disposable": True,
}


def _own(value: Any, unsloth_default: str) -> Any:
    """None (fastsave's own default) for Unsloth's default text, else the value given."""
    return None if value == unsloth_default else value


def _changed(**given: Any) -> dict[str, Any]:
    """The Unsloth-only keywords given a value other than Unsloth's default."""
    return {
        name: value
        for name, value in given.items()
        if value is not _UNSLOTH_ONLY[name] and value != _UNSLOTH_ONLY[name]
    }


def save_pretrained_merged(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    push_to_hub: bool = False,
    token: str | bool | None = None,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    save_function: Callable = torch.save,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    save_peft_format: bool = True,
    tags: list[str] | None = None,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.75,
    datasets: list[str] | None = None,
    calibration_dataset: Any = None,
    num_calibration_samples: int = 512,
    max_seq_length: int = 2048,
    install_missing_dependencies: bool = True,
    **options: Any,
) -> None:
    """Save this model merged (or as an adapter): see ``fastsave.save_pretrained_merged``. Returns
    None, as Unsloth's method does (the function returns the saved path)."""
    from fastsave.api import save_pretrained_merged as save

    save(
        self,
        save_directory,
        tokenizer,
        save_method=save_method,
        push_to_hub=push_to_hub,
        token=token,
        is_main_process=is_main_process,
        state_dict=state_dict,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        variant=variant,
        save_peft_format=save_peft_format,
        tags=tags,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        datasets=datasets,
        **_changed(
            save_function=save_function,
            calibration_dataset=calibration_dataset,
            num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length,
            install_missing_dependencies=install_missing_dependencies,
        ),
        **options,
    )


def push_to_hub_merged(
    self: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    use_temp_dir: bool | None = None,
    commit_message: str | None = UNSLOTH_COMMIT_MESSAGE,
    private: bool | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str | None = "5GB",
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    commit_description: str = UNSLOTH_COMMIT_DESCRIPTION,
    tags: list[str] | None = None,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.75,
    datasets: list[str] | None = None,
    calibration_dataset: Any = None,
    num_calibration_samples: int = 512,
    max_seq_length: int = 2048,
    install_missing_dependencies: bool = True,
    **options: Any,
) -> None:
    """Save this model merged, then upload it to the hub as ``repo_id``: see ``fastsave.api``.
    Returns None, as Unsloth's method does."""
    from fastsave.api import push_to_hub_merged as push

    push(
        self,
        repo_id,
        tokenizer,
        save_method=save_method,
        use_temp_dir=use_temp_dir,
        commit_message=commit_message,
        private=private,
        token=token,
        max_shard_size=max_shard_size,
        create_pr=create_pr,
        safe_serialization=safe_serialization,
        revision=revision,
        commit_description=commit_description,
        tags=tags,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        datasets=datasets,
        **_changed(
            calibration_dataset=calibration_dataset,
            num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length,
            install_missing_dependencies=install_missing_dependencies,
        ),
        **options,
    )


def save_pretrained_gguf(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    quantization_method: Any = "fast_quantized",
    first_conversion: str | None = None,
    push_to_hub: bool = False,
    token: str | bool | None = None,
    private: bool | None = None,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    save_function: Callable = torch.save,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    save_peft_format: bool = True,
    tags: list[str] | None = None,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.85,
    save_method: str | None = None,
    imatrix_file: Any = None,
    merge_is_disposable: bool = True,
    **options: Any,
) -> dict[str, Any] | str | None:
    """Merge this model and convert it to GGUF with llama.cpp: see ``fastsave.export``.

    ``save_method="lora"`` writes the adapter alone as a GGUF LoRA file (fastsave.export.lora_gguf;
    quantization_method: f16 (default), f32, bf16 or q8_0).

    Returns what Unsloth's method returns: ``{"save_directory", "gguf_directory", "gguf_files"
    (the paths written), "modelfile_location" (None: fastsave writes no Ollama Modelfile),
    "want_full_precision" (every file 16- or 32-bit), "is_vlm" (False: text models),
    "fix_bos_token" (False: the tokenizer is never edited)}``; the file's path for a LoRA GGUF;
    None with is_main_process=False.
    """
    from fastsave.export.save_gguf import save_pretrained_gguf as export

    paths = export(
        self,
        save_directory,
        tokenizer,
        quantization_method,
        first_conversion=first_conversion,
        imatrix_file=imatrix_file,
        push_to_hub=push_to_hub,
        token=token,
        private=private,
        is_main_process=is_main_process,
        state_dict=state_dict,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        variant=variant,
        save_peft_format=save_peft_format,
        tags=tags,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        save_method=save_method,
        **_changed(save_function=save_function, merge_is_disposable=merge_is_disposable),
        **options,
    )
    if paths is None:
        return None
    from fastsave.export.methods import is_lora

    if is_lora(save_method):  # Unsloth returns the LoRA GGUF's path
        return paths[0]
    return {
        "save_directory": str(save_directory),
        "gguf_directory": str(save_directory),
        "gguf_files": paths,
        "modelfile_location": None,
        "want_full_precision": all(Path(p).suffixes[-2:-1] in ([".F16"], [".BF16"], [".F32"]) for p in paths),
        "is_vlm": False,
        "fix_bos_token": False,
    }


def push_to_hub_gguf(
    self: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    quantization_method: Any = "fast_quantized",
    first_conversion: str | None = None,
    use_temp_dir: bool | None = None,
    commit_message: str | None = UNSLOTH_COMMIT_MESSAGE,
    private: bool | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str | None = "5GB",
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    commit_description: str = UNSLOTH_COMMIT_DESCRIPTION,
    tags: list[str] | None = None,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.85,
    datasets: list[str] | None = None,
    save_method: str | None = None,
    imatrix_file: Any = None,
    is_main_process: bool = True,
    **options: Any,
) -> str | None:
    """Export this model to GGUF, then upload it to the hub as ``repo_id``: see ``fastsave.export``.
    Returns the full repo id (``user/name``), as Unsloth's method does; None with is_main_process=False."""
    from fastsave.export.save_gguf import push_to_hub_gguf as push

    url = push(
        self,
        repo_id,
        tokenizer,
        quantization_method,
        first_conversion=first_conversion,
        imatrix_file=imatrix_file,
        use_temp_dir=use_temp_dir,
        commit_message=commit_message,
        private=private,
        token=token,
        max_shard_size=max_shard_size,
        create_pr=create_pr,
        safe_serialization=safe_serialization,
        revision=revision,
        commit_description=commit_description,
        tags=tags,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        datasets=datasets,
        save_method=save_method,
        is_main_process=is_main_process,
        **options,
    )
    if url is None:
        return None
    return repo_id_of(url, repo_id)


def repo_id_of(url: str, asked: str) -> str:
    """The full repo id (``user/name``) from the hub URL an upload returned; ``asked`` when the URL
    does not say it (a fake or unusual hub)."""
    parts = [part for part in urlparse(str(url)).path.split("/") if part]
    if parts[:1] in (["datasets"], ["spaces"]):
        parts = parts[1:]
    return "/".join(parts[:2]) if len(parts) >= 2 else asked


def save_pretrained_torchao(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    torchao_config: Any = None,
    push_to_hub: bool = False,
    token: str | bool | None = None,
    **options: Any,
) -> None:
    """Merge this model and save it quantized with torchao (fastsave.export.torchao_export);
    returns None, as Unsloth's method does."""
    from fastsave.export.torchao_export import save_pretrained_torchao as save

    save(self, save_directory, tokenizer, torchao_config, push_to_hub, token, **options)


UNSLOTH_LORA_COMMIT_MESSAGE = "Converted LoRA to GGUF with Unsloth"
UNSLOTH_LORA_COMMIT_DESCRIPTION = "Convert LoRA to GGUF format using Unsloth"


def save_pretrained_ggml(
    self: nn.Module,
    save_directory: str,
    tokenizer: Any,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.85,
    outtype: str = "f16",
    **options: Any,
) -> str | None:
    """Write this model's LoRA adapter as a GGUF LoRA file (f16, f32, bf16 or q8_0) with llama.cpp's
    convert_lora_to_gguf.py (fastsave.export.lora_gguf); returns its path, as Unsloth's method does."""
    from fastsave.pipeline.preflight import not_main_process

    if not_main_process(self, options):
        return None
    from fastsave.export.lora_gguf import save_lora_gguf

    return save_lora_gguf(
        self,
        save_directory,
        outtype,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        **options,
    )


def push_to_hub_ggml(
    self: nn.Module,
    tokenizer: Any,
    repo_id: str,
    use_temp_dir: bool | None = None,
    commit_message: str | None = UNSLOTH_LORA_COMMIT_MESSAGE,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str = UNSLOTH_LORA_COMMIT_DESCRIPTION,
    temporary_location: str = UNSLOTH_BUFFERS,
    maximum_memory_usage: float = 0.85,
    outtype: str = "f16",
    **options: Any,
) -> str | None:
    """:meth:`save_pretrained_ggml`, then upload the file to the hub as ``repo_id`` (note Unsloth's
    order: the tokenizer first); returns the full repo id, as Unsloth's method does."""
    from fastsave.pipeline.preflight import not_main_process

    if not_main_process(self, options):
        return None
    from fastsave.export.lora_gguf import push_lora_gguf

    url = push_lora_gguf(
        self,
        repo_id,
        outtype,
        use_temp_dir=use_temp_dir,
        commit_message=commit_message,
        private=private,
        token=token,
        create_pr=create_pr,
        revision=revision,
        commit_description=commit_description,
        temporary_location=_own(temporary_location, UNSLOTH_BUFFERS),
        maximum_memory_usage=maximum_memory_usage,
        **options,
    )
    return repo_id_of(url, repo_id)


METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "push_to_hub_merged": push_to_hub_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_gguf": push_to_hub_gguf,
    "save_pretrained_ggml": save_pretrained_ggml,
    "push_to_hub_ggml": push_to_hub_ggml,
    "save_pretrained_torchao": save_pretrained_torchao,
}
