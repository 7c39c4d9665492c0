"""Tensors of a local safetensors checkpoint, read one at a time (never the whole state dict).

Finding the checkpoint never downloads: a local directory, or a repo already in the local Hugging
Face cache (``local_files_only=True``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from fastsave.sources.base import RowReader, Source

logger = logging.getLogger("fastsave")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def find_in_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, or None; never downloads."""
    if not repo_id or Path(repo_id).is_absolute() or repo_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as error:  # not cached, an invalid repo id, no cache folder: all mean "not here"
        logger.debug("fastsave: %r not found in the local Hugging Face cache (%s)", repo_id, error)
        return None
    return Path(path)


def resolve_checkpoint_dir(
    candidates: Iterable[str | Path | None], revision: str | None = None
) -> tuple[Path | None, list[str]]:
    """The first candidate that is a local directory or a repo id in the local HF cache (at ``revision``).

    Returns the directory (None when no candidate resolves) and what was tried, for the error message.
    """
    tried: list[str] = []
    for candidate in candidates:
        if candidate is None or str(candidate) == "":
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path, tried
        cached = find_in_hf_cache(str(candidate), revision)
        if cached is not None:
            return cached, tried
        tried.append(f"{str(candidate)!r} (not a local directory, not in the local Hugging Face cache)")
    return None, tried


def check_not_quantized_checkpoint(directory: Path, what: str, hint: str = "") -> None:
    """Refuse a checkpoint whose config.json says it is already quantized (bnb-4bit repos and the like).

    Raises:
        ValueError: the checkpoint holds quantized weights, not the 16-bit base.
    """
    config_file = directory / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ValueError(
            f"{what} {str(directory)!r} is a {method} checkpoint, not the 16-bit base: point to the "
            f"original 16-bit model instead (the repo the quantized one was made from){hint}"
        )


class SafetensorsCheckpoint:
    """The tensors of a local safetensors checkpoint: names, shapes and dtypes from the headers."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / WEIGHTS_INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            files = {}
            with safe_open(single, "pt") as handle:
                files = dict.fromkeys(handle.keys(), single)
        else:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (it holds {', '.join(bins)}: convert it to safetensors first)" if bins else ""
            raise ValueError(f"{str(self.directory)!r} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
        self.file_of = files
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(files.values())):
            with safe_open(file, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    tensor_slice = handle.get_slice(name)
                    self._meta[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())

    def __contains__(self, name: object) -> bool:
        return name in self.file_of

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of one tensor (from the header)."""
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor (from the header)."""
        code = self._meta[name][1].upper()
        if code not in _TORCH_DTYPES:
            raise ValueError(f"{name} in {self.directory} has dtype {code}, which fastsave does not read")
        return _TORCH_DTYPES[code]

    def is_floating_point(self, name: str) -> bool:
        """Whether the stored tensor is of a floating-point dtype."""
        return self._meta[name][1].upper() in _FLOAT_DTYPES

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file now."""
        with safe_open(self.file_of[name], "pt") as handle:
            return handle.get_tensor(name)

    def rows(self, name: str, i: int, j: int) -> torch.Tensor:
        """Rows i..j of one tensor (only those bytes are read)."""
        with safe_open(self.file_of[name], "pt") as handle:
            return handle.get_slice(name)[i:j]

    def source(self, name: str) -> SafetensorsTensorSource:
        """The source that reads ``name`` from this checkpoint."""
        return SafetensorsTensorSource(self, name)


class SafetensorsTensorSource(Source):
    """One tensor of a safetensors checkpoint on disk, read when the merge needs it."""

    kind = "safetensors file"

    def __init__(self, checkpoint: SafetensorsCheckpoint, name: str) -> None:
        super().__init__(checkpoint.shape(name), checkpoint.dtype(name), torch.device("cpu"))
        self.checkpoint = checkpoint
        self.name = name

    def float32(self) -> torch.Tensor:
        """The stored values as float32."""
        return self.checkpoint.get(self.name).to(torch.float32)

    def as_stored(self) -> torch.Tensor:
        """The stored tensor."""
        return self.checkpoint.get(self.name)

    def row_reader(self) -> RowReader | None:
        """Rows read from disk (only their bytes), as float32."""
        if len(self.shape) != 2 or not self.floating:
            return None
        return RowReader(lambda i, j: self.checkpoint.rows(self.name, i, j).to(torch.float32))

    def describe(self) -> str:
        """Where the tensor is read from."""
        return f"16-bit checkpoint {self.checkpoint.directory}"


class StoredPiecesSource(Source):
    """A tensor the model fuses while loading (MoE experts) that the checkpoint stores as several pieces.

    Copied piece by piece under the checkpoint's own names; its fused values are never built, so no
    delta can be merged into it.
    """

    kind = "safetensors file"

    def __init__(
        self, checkpoint: SafetensorsCheckpoint, shape: tuple[int, ...], pieces: dict[str, tuple[int, ...]]
    ) -> None:
        first = next(iter(pieces))
        super().__init__(shape, checkpoint.dtype(first), torch.device("cpu"))
        self.checkpoint = checkpoint
        self.pieces = {name: checkpoint.source(name) for name in pieces}

    def float32(self) -> torch.Tensor:
        """Not available: the pieces are copied as they are stored."""
        from fastsave.errors import PlanError

        raise PlanError(
            f"{', '.join(list(self.pieces)[:3])} ...: the checkpoint stores this tensor in pieces that transformers "
            "fuses while loading, so the command line copies them as they are and cannot merge LoRA on them "
            "(peft's target_parameters); merge in the training session with save_pretrained_merged"
        )
