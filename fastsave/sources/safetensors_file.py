"""Tensors of a local safetensors checkpoint, read one at a time (never the whole state dict).

Finding the checkpoint never downloads: a local directory, or a repo already in the local Hugging
Face cache (``local_files_only=True``).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

from fastsave.io.format import FLOAT_CODES, TORCH_DTYPES, read_safetensors_header
from fastsave.io.names import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from fastsave.sources.base import RowRead, RowReader, Source
from fastsave.sources.dense import merged_in_one_pass

logger = logging.getLogger(__name__)


def _read_header(file: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets) and where its data starts."""
    header = dict(read_safetensors_header(file))
    data_start = header.pop("__header_bytes__")
    header.pop("__metadata__", None)
    return header, data_start


def clip_rows(i: int, j: int, n_rows: int) -> tuple[int, int]:
    """Rows i..j of a tensor of ``n_rows`` rows, clipped to it (an empty range where none are)."""
    i, j = max(0, min(i, n_rows)), max(0, min(j, n_rows))
    return i, max(i, j)


def _close_all(descriptors: dict[Path, int]) -> None:
    for descriptor in descriptors.values():
        os.close(descriptor)
    descriptors.clear()


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
    """The tensors of a local safetensors checkpoint: names, shapes and dtypes from the headers.

    Tensors are read with positional reads of their own bytes, not through safetensors' memory map:
    a map of each file is a private writable mapping as large as the file, which counts against
    RLIMIT_DATA (and ``ulimit -d``-style caps) for as long as it is open, even when untouched. One
    file descriptor per file is kept for the checkpoint's lifetime.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / WEIGHTS_INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        headers: dict[Path, tuple[dict[str, dict], int]] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            headers[single] = _read_header(single)
            files = dict.fromkeys(headers[single][0], single)
        else:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (it holds {', '.join(bins)}: convert it to safetensors first)" if bins else ""
            raise ValueError(f"{str(self.directory)!r} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
        self.file_of = files
        # name -> (shape, dtype code, absolute byte offset of its data, its byte count)
        self._meta: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        for file in sorted(set(files.values())):
            entries, data_start = headers[file] if file in headers else _read_header(file)
            for name, entry in entries.items():
                begin, stop = entry["data_offsets"]
                self._meta[name] = (tuple(entry["shape"]), entry["dtype"], data_start + begin, stop - begin)
        missing = [name for name in files if name not in self._meta]
        if missing:
            raise ValueError(
                f"{str(self.directory)!r}: its index names {len(missing)} tensor(s) that no shard holds, "
                f"e.g. {missing[0]!r}: the checkpoint is incomplete"
            )
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._descriptors)

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
        if code not in TORCH_DTYPES:
            raise ValueError(f"{name} in {self.directory} has dtype {code}, which fastsave does not read")
        return TORCH_DTYPES[code]

    def is_floating_point(self, name: str) -> bool:
        """Whether the stored tensor is of a floating-point dtype."""
        return self._meta[name][1].upper() in FLOAT_CODES

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file now."""
        shape = self.shape(name)
        return self._read(name, 0, self._meta[name][3]).view(self.dtype(name)).reshape(shape)

    def rows(self, name: str, i: int, j: int) -> torch.Tensor:
        """Rows i..j of one tensor (only those bytes are read)."""
        i, j, skip, count = self._row_span(name, i, j)
        values = self._read(name, skip, count)
        return values.view(self.dtype(name)).reshape((j - i, *self.shape(name)[1:]))

    def mapped_rows(self, name: str, i: int, j: int) -> torch.Tensor:
        """Rows i..j of one tensor as a read-only view of the file's pages: mapped, nothing copied
        into fresh memory (a read-only shared mapping, which RLIMIT_DATA does not count; unmapped
        when the tensor is garbage). Never write to it: the pages are not writable."""
        i, j, skip, count = self._row_span(name, i, j)
        shape, dtype = (j - i, *self.shape(name)[1:]), self.dtype(name)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._meta[name][2] + skip
        descriptor = self._descriptor(self.file_of[name])
        if os.fstat(descriptor).st_size < offset + count:
            raise ValueError(
                f"{self.file_of[name]} ends before the data of {name!r}: the checkpoint file is truncated"
            )
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(descriptor, offset + count - start, access=mmap.ACCESS_READ, offset=start)
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is not, by design
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(mapping, dtype=torch.uint8, count=count, offset=offset - start)
        return values.view(dtype).reshape(shape)

    def _row_span(self, name: str, i: int, j: int) -> tuple[int, int, int, int]:
        """Rows i..j clipped to the tensor, and the byte offset and count of their data."""
        shape = self.shape(name)
        i, j = clip_rows(i, j, shape[0])
        row_bytes = self._meta[name][3] // shape[0] if shape[0] else 0
        return i, j, i * row_bytes, (j - i) * row_bytes

    def _descriptor(self, file: Path) -> int:
        with self._lock:
            if file not in self._descriptors:
                self._descriptors[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._descriptors[file]

    def _read(self, name: str, skip: int, count: int) -> torch.Tensor:
        """``count`` bytes of ``name``'s data from byte ``skip`` on, as a fresh uint8 tensor."""
        offset = self._meta[name][2] + skip
        buffer = torch.empty(count, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        descriptor = self._descriptor(self.file_of[name])
        done = 0
        while done < count:  # os.preadv may return fewer bytes than asked
            got = os.preadv(descriptor, [view[done:]], offset + done)
            if got == 0:
                raise ValueError(
                    f"{self.file_of[name]} ends before the data of {name!r}: the checkpoint file is truncated"
                )
            done += got
        return buffer

    def source(self, name: str) -> SafetensorsTensorSource:
        """The source that reads ``name`` from this checkpoint."""
        return SafetensorsTensorSource(self, name)


# how much of a tensor's data a row reader keeps mapped at once: a map and an unmap per row block
# (1M values) cost more than the pages themselves. At 1B on 2 cores, in one process, 6 interleaved
# rounds, medians: `fastsave merge` 1.80-1.88 s against 1.98 s (3.16-3.29 against 3.50
# CPU-seconds), `--base-weights original` 1.54 against 1.56 s. The pages are the file's, read-only
# and shared: RLIMIT_DATA does not count them, and the kernel may drop them under memory pressure
# (they are read again when used).
MAPPED_WINDOW_BYTES = 16 << 20


class MappedWindow:
    """Rows of one tensor served from one read-only mapping of up to :data:`MAPPED_WINDOW_BYTES` of
    its data (a read larger than that is mapped whole), mapped anew only when a read falls outside
    it: from the read on, or, for a read before the window (a pass from the end), ending with it.
    A block handed out keeps its own mapping alive, after the window moved on too."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, name: str) -> None:
        self.checkpoint, self.name = checkpoint, name
        shape = checkpoint.shape(name)
        self.n_rows = shape[0]
        row_bytes = checkpoint.dtype(name).itemsize * math.prod(shape[1:])
        self.rows_per_window = max(1, MAPPED_WINDOW_BYTES // max(1, row_bytes))
        self.first = self.end = 0
        self.mapped: torch.Tensor | None = None

    def rows(self, i: int, j: int) -> torch.Tensor:
        """Rows i..j (clipped to the tensor) as a read-only view of the file's pages: never write to it."""
        i, j = clip_rows(i, j, self.n_rows)
        if self.mapped is None or i < self.first or j > self.end:
            backwards = self.mapped is not None and i < self.first
            self.mapped = None  # unmapped once no block handed out views it
            if backwards:  # reading towards the start: the window ends where the read does
                self.first, self.end = min(i, max(0, j - self.rows_per_window)), j
            else:
                self.first, self.end = i, min(self.n_rows, max(j, i + self.rows_per_window))
            self.mapped = self.checkpoint.mapped_rows(self.name, self.first, self.end)
        return self.mapped[i - self.first : j - self.first]


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

    def stored_rows(self) -> RowRead | None:
        """Rows as read-only views of the file's pages, a window of them mapped at a time."""
        return MappedWindow(self.checkpoint, self.name).rows if len(self.shape) == 2 else None

    def row_reader(self) -> RowReader | None:
        """Rows read from disk (only their bytes), as float32 (or as stored)."""
        if len(self.shape) != 2 or not self.floating:
            return None
        # rows straight from the file's pages (mapped a window at a time): no fresh memory per
        # block, one copy
        window = MappedWindow(self.checkpoint, self.name)
        return RowReader(
            lambda i, j: self.checkpoint.rows(self.name, i, j).to(torch.float32),
            read_stored=window.rows,
            read_into=lambda i, j, out: out.copy_(window.rows(i, j)),
            read_merged=merged_in_one_pass(self.stored_dtype, window.rows),
        )

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
