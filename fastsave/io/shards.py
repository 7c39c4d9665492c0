"""Stream planned tensors into sharded safetensors files in a staging directory.

The safetensors format is an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes. Because the plan knows every shape and
dtype before any merge runs, each shard's header is written first and tensors are appended as
they are produced: no shard, and never the whole state dict, is ever held in memory.

Every floating piece was checked for NaN/Inf by the producer (fastsave.pipeline.producer); every
shard's data is checksummed (fastsave.io.checksums) and written through aligned buffers, with
O_DIRECT where the filesystem allows it (fastsave.io.direct_file), the header last; a full disk
becomes a DiskSpaceError that says how many bytes were still to write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fastsave.errors import DiskSpaceError
from fastsave.io.checksums import CRC32_KEY, BlockCrc32, placeholder
from fastsave.io.direct_file import ALIGN, BUFFER_BYTES, DEPTH, AlignedWriter
from fastsave.io.disk_space import FULL_DISK_ERRNOS, full_disk_error
from fastsave.io.format import FASTSAVE_METADATA_KEY, encode_header, fastsave_version
from fastsave.io.names import index_name, shard_names, variant_of


class PlannedTensor(Protocol):
    """What the writer reads of a planned output tensor (fastsave.plan.items.PlanItem is one)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def nbytes(self) -> int: ...


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
    tensors: Sequence[PlannedTensor],
    max_shard_size: int,
    safe_serialization: bool = True,
    variant: str | None = None,
) -> list[Shard]:
    """Cut the plan into shards of at most ``max_shard_size`` bytes, in plan order (like transformers).

    A tensor larger than the limit gets a shard of its own. Names follow transformers
    (fastsave.io.names): ``model.safetensors`` for one shard, ``model-0000i-of-0000N.safetensors``
    for several, with ``variant`` before the extension.
    """
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    names = shard_names(len(groups), safe_serialization, variant)
    return [Shard(name, group) for name, group in zip(names, groups, strict=True)]


def data_offsets(shards: Sequence[Shard]) -> dict[int, int]:
    """Where each tensor's data begins in its shard's data section, by ``id`` of its plan item (the
    data section begins at a multiple of ALIGN, so this is its file offset modulo ALIGN too)."""
    offsets: dict[int, int] = {}
    for shard in shards:
        position = 0
        for tensor in shard.tensors:
            offsets[id(tensor)] = position
            position += tensor.nbytes
    return offsets


def shard_metadata(checksum: str) -> dict[str, str]:
    """The ``__metadata__`` of a shard fastsave writes, with its data's ``checksum`` (a placeholder of
    the same length while the data is written)."""
    return {"format": "pt", FASTSAVE_METADATA_KEY: fastsave_version(), CRC32_KEY: checksum}


def write_index(
    directory: Path,
    shards: Sequence[Shard],
    digests: dict[str, str],
    safe_serialization: bool = True,
) -> None:
    """The index of a checkpoint of several shards: every tensor's shard, the size, each shard's
    checksums (named for the variant the shards' names carry)."""
    total = sum(shard.nbytes for shard in shards)
    metadata: dict[str, Any] = {"total_size": total, FASTSAVE_METADATA_KEY: fastsave_version()}
    if digests:
        metadata[CRC32_KEY] = dict(sorted(digests.items()))
    index = {
        "metadata": metadata,
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }
    with open(directory / index_name(safe_serialization, variant_of(shards[0].filename)), "w") as handle:
        handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Writes shards one tensor at a time, checking each against the plan.

    Use as ``writer.write(tensor)`` in plan order (or ``write_piece`` for each piece of a tensor,
    then ``end_tensor``), then ``writer.close()``, which writes the index when there is more than
    one shard. The pieces come checked for NaN/Inf (fastsave.pipeline.producer); each
    safetensors shard records the CRC-32s of its data in its header (and the index, when there is
    one).

    ``index=False``: the caller writes the index (:func:`write_index`), as when several ranks each
    write some of the shards of one checkpoint. ``buffer_bytes`` x ``depth``: the memory the
    aligned writes hold (fastsave.io.direct_file), from construction to close or abort;
    ``joined_bytes``: the largest write that writes waiting back to back are joined into.
    """

    def __init__(
        self,
        directory: Path,
        shards: list[Shard],
        safe_serialization: bool = True,
        index: bool = True,
        on_shard_done: Callable[[Path], None] | None = None,
        buffer_bytes: int = BUFFER_BYTES,
        depth: int = DEPTH,
        joined_bytes: int = 0,
    ) -> None:
        self.directory = directory
        self.on_shard_done = on_shard_done  # called with each shard's path once it is complete on disk
        self.shards = shards
        self.safe_serialization = safe_serialization
        self.index = index
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard.tensors]
        self._position = 0
        self._open_index = -1
        self._bin_buffer: dict[str, torch.Tensor] = {}
        self._file = AlignedWriter(buffer_bytes, depth, joined_bytes) if safe_serialization else None
        self._checksum: BlockCrc32 | None = None
        self.digests: dict[str, str] = {}  # shard file name -> the CRC-32s of its data section
        self._total = sum(s.nbytes for s in shards)
        self._written = 0
        self._piece_bytes = 0  # bytes of the current tensor written so far
        self._bin_pieces: list[torch.Tensor] = []

    def _open(self, index: int) -> None:
        self._finish_current()
        shard = self.shards[index]
        if self.safe_serialization:
            header = encode_header(shard.tensors, shard_metadata(placeholder(shard.nbytes)), ALIGN)
            self._checksum = BlockCrc32()
            self._file.begin(self.directory / shard.filename, len(header), self._checksum)
        self._open_index = index

    def _write_data(self, data: bytes | memoryview, release: Callable[[], None] | None = None) -> None:
        """The one place tensor bytes go to a shard file (tests inject faults here); the header is
        written by ``_finish_current``, once the data is. ``release``: as for ``AlignedWriter.write``."""
        self._file.write(data, release)

    def _finish_current(self) -> None:
        if self._open_index < 0:
            return
        shard = self.shards[self._open_index]
        if self.safe_serialization:
            checksum = self._checksum

            def header() -> bytes:  # called once every data byte is out, so the checksum is complete
                return encode_header(shard.tensors, shard_metadata(checksum.recorded()), ALIGN)

            self._file.finish(header)
            self.digests[shard.filename] = checksum.recorded()
        else:
            # torch.save needs the whole shard: a legacy format, kept to one shard's worth of RAM.
            torch.save(self._bin_buffer, self.directory / shard.filename)
            self._bin_buffer = {}
        self._open_index = -1
        if self.on_shard_done is not None:
            self.on_shard_done(self.directory / shard.filename)

    def write(self, tensor: torch.Tensor) -> None:
        """Append the next planned tensor whole; its shape and dtype must match the plan.

        Raises:
            DiskSpaceError: the disk filled up (with the bytes still to write).
        """
        if self._position >= len(self._order):
            raise RuntimeError("more tensors written than planned")
        _, planned = self._order[self._position]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"tensor {planned.name!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {planned.shape} {planned.dtype}"
            )
        self.write_piece(tensor)
        self.end_tensor()

    def write_piece(self, piece: torch.Tensor, release: Callable[[], None] | None = None) -> None:
        """Append the next piece of the planned tensor being written (its flattened values, in order).

        A tensor streamed block by block reaches the file without ever existing whole in memory;
        each piece is checksummed as it passes.

        ``release``: the writer may keep the piece's memory until its bytes are written (a piece
        placed for its file offset, fastsave.io.placement, is written without a copy) and calls
        this once it no longer reads it; the caller leaves the piece unchanged until then. Without
        it the piece is copied before this returns.

        Raises:
            DiskSpaceError: the disk filled up (with the bytes still to write).
        """
        if self._position >= len(self._order):
            raise RuntimeError("more tensors written than planned")
        index, planned = self._order[self._position]
        if piece.dtype != planned.dtype:
            raise RuntimeError(
                f"a piece of tensor {planned.name!r} came out as {piece.dtype}, planned {planned.dtype}"
            )
        nbytes = piece.numel() * piece.element_size()
        if self._piece_bytes + nbytes > planned.nbytes:
            raise RuntimeError(
                f"tensor {planned.name!r} came out larger than its planned {planned.nbytes} bytes"
            )
        with self._full_disk_is_disk_space_error():
            if index != self._open_index:
                self._open(index)
            if self.safe_serialization:
                self._write_data(_tensor_bytes(piece), release)
                release = None
            else:
                self._bin_pieces.append(piece.detach().reshape(-1).clone())
        if release is not None:
            release()
        self._piece_bytes += nbytes
        self._written += nbytes

    def end_tensor(self) -> None:
        """Finish the planned tensor being written; its pieces must add up to its planned size."""
        index, planned = self._order[self._position]
        if index != self._open_index:  # an empty tensor opens its shard too
            with self._full_disk_is_disk_space_error():
                self._open(index)
        if self._piece_bytes != planned.nbytes:
            raise RuntimeError(
                f"tensor {planned.name!r} came out as {self._piece_bytes} bytes, planned {planned.nbytes}"
            )
        if not self.safe_serialization:
            pieces, self._bin_pieces = self._bin_pieces, []
            flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=planned.dtype)
            self._bin_buffer[planned.name] = flat.reshape(planned.shape)
        self._piece_bytes = 0
        self._position += 1

    def flush(self) -> None:
        """Start writing what waits to be written together (the caller is about to wait for more)."""
        if self._file is not None and self._open_index >= 0:
            with self._full_disk_is_disk_space_error():
                self._file.flush()

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._position != len(self._order):
            raise RuntimeError(f"only {self._position} of {len(self._order)} planned tensors were written")
        with self._full_disk_is_disk_space_error():
            self._finish_current()
            if self.index and len(self.shards) > 1:
                write_index(self.directory, self.shards, self.digests, self.safe_serialization)
        if self._file is not None:
            self._file.close()

    def abort(self) -> None:
        """Close any open file without finishing it (the staging directory is removed by the caller)."""
        if self._file is not None:
            self._file.close()

    @contextmanager
    def _full_disk_is_disk_space_error(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if error.errno in FULL_DISK_ERRNOS and not isinstance(error, DiskSpaceError):
                raise full_disk_error(self.directory, self._total - self._written) from error
            raise
