"""Stream planned tensors into sharded safetensors files in a staging directory, then publish it.

The safetensors format is an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes. Because the plan knows every shape and
dtype before any merge runs, each shard's header is written first and tensors are appended as
they are produced: no shard, and never the whole state dict, is ever held in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsave.plan.items import PlanItem as PlannedTensor

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


@dataclass
class Shard:
    """One output file and the tensors it holds, in write order."""

    filename: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this shard."""
        return sum(t.nbytes for t in self.tensors)


def assign_shards(
    tensors: Sequence[PlannedTensor], max_shard_size: int, safe_serialization: bool = True
) -> list[Shard]:
    """Cut the plan into shards of at most ``max_shard_size`` bytes, in plan order (like transformers).

    A tensor larger than the limit gets a shard of its own. Names follow transformers:
    ``model.safetensors`` for one shard, ``model-0000i-of-0000N.safetensors`` for several.
    """
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    single = WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME
    stem, ext = single.rsplit(".", 1)
    if len(groups) == 1:
        return [Shard(single, groups[0])]
    count = len(groups)
    return [Shard(f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}", group) for i, group in enumerate(groups)]


def _safetensors_header(shard: Shard, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in shard.tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {tensor.name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        header[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Writes shards one tensor at a time, checking each against the plan.

    Use as ``writer.write(tensor)`` in plan order, then ``writer.close()``, which writes the index
    when there is more than one shard.
    """

    def __init__(self, directory: Path, shards: list[Shard], safe_serialization: bool = True) -> None:
        self.directory = directory
        self.shards = shards
        self.safe_serialization = safe_serialization
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard.tensors]
        self._position = 0
        self._file = None
        self._open_index = -1
        self._bin_buffer: dict[str, torch.Tensor] = {}

    def _open(self, index: int) -> None:
        self._finish_current()
        shard = self.shards[index]
        path = self.directory / shard.filename
        if self.safe_serialization:
            self._file = open(path, "wb")  # noqa: SIM115 - closed in _finish_current
            self._file.write(_safetensors_header(shard, {"format": "pt"}))
        self._open_index = index

    def _finish_current(self) -> None:
        if self._open_index < 0:
            return
        if self.safe_serialization and self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        elif not self.safe_serialization:
            # torch.save needs the whole shard: a legacy format, kept to one shard's worth of RAM.
            torch.save(self._bin_buffer, self.directory / self.shards[self._open_index].filename)
            self._bin_buffer = {}
        self._open_index = -1

    def write(self, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its shape and dtype must match the plan."""
        if self._position >= len(self._order):
            raise RuntimeError("more tensors written than planned")
        index, planned = self._order[self._position]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"tensor {planned.name!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {planned.shape} {planned.dtype}"
            )
        if index != self._open_index:
            self._open(index)
        if self.safe_serialization:
            self._file.write(_tensor_bytes(tensor))
        else:
            self._bin_buffer[planned.name] = tensor.clone()
        self._position += 1

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._position != len(self._order):
            raise RuntimeError(f"only {self._position} of {len(self._order)} planned tensors were written")
        self._finish_current()
        if len(self.shards) > 1:
            index_name = WEIGHTS_INDEX_NAME if self.safe_serialization else BIN_WEIGHTS_INDEX_NAME
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Close any open file without finishing it (the staging directory is removed by the caller)."""
        if self._file is not None:
            self._file.close()
            self._file = None


# Files of an earlier checkpoint in save_directory that a new save makes stale.
STALE_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether moving from one path to the other is a rename (no copy, no extra space)."""
    return os.stat(a).st_dev == os.stat(b).st_dev


def apply_umask_modes(directory: Path) -> None:
    """Give staged files the modes the user's umask asks for (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.chmod(directory, 0o777 & ~umask)


def publish(staging: Path, save_directory: Path) -> None:
    """Move a finished staging directory into ``save_directory`` so no half-written checkpoint shows.

    A new (or empty) save_directory is replaced by the staging directory in one rename. An existing
    one keeps its other files: stale weight files go first, config.json (which makes a directory a
    loadable checkpoint) is removed first and moved in last.
    """
    apply_umask_modes(staging)
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    same_fs = same_filesystem(staging, save_directory.parent)
    if save_directory.is_dir() and not any(save_directory.iterdir()):
        save_directory.rmdir()
    if not save_directory.exists() and same_fs:
        os.replace(staging, save_directory)
        return
    save_directory.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    last = [n for n in ("config.json", "adapter_config.json") if n in names]
    for name in last:
        (save_directory / name).unlink(missing_ok=True)
    for pattern in STALE_PATTERNS:
        for stale in save_directory.glob(pattern):
            if stale.name not in names:
                stale.unlink()
    for name in [n for n in names if n not in last] + last:
        target = save_directory / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        shutil.move(str(staging / name), str(target))
    shutil.rmtree(staging, ignore_errors=True)
