"""Replace a name where the code looks it up, and know whether the code still looks there.

``monkeypatch.setattr("module.name", value)`` keeps passing after the code that used
``module.name`` moved elsewhere: the patch is then a no-op and the test tests nothing.
:func:`replace_at` records each call of the replacement, so a test asserts it was reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def replace_at(monkeypatch: Any, target: str, replacement: Callable) -> list[tuple]:
    """Patch ``target`` ("package.module.name") with ``replacement``; returns the list of the
    argument tuples it was called with, filled in as the code calls it."""
    calls: list[tuple] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return replacement(*args, **kwargs)

    monkeypatch.setattr(target, recording)
    return calls


def fail_pwrite_at(monkeypatch: Any, call: int, code: int, delay: float = 0.0) -> list[int]:
    """``os.pwrite`` and ``os.pwritev``, as fastsave.io.direct_file's I/O thread calls them, failing
    with errno ``code`` at their ``call``-th call, counted together (after ``delay`` seconds);
    returns the offsets they were called with."""
    import os
    import time

    offsets: list[int] = []

    def failing(real: Any) -> Any:
        def write(fd: int, data: Any, offset: int) -> int:
            offsets.append(offset)
            if len(offsets) == call:
                time.sleep(delay)
                raise OSError(code, os.strerror(code))
            return real(fd, data, offset)

        return write

    monkeypatch.setattr("fastsave.io.direct_file.os.pwrite", failing(os.pwrite))
    monkeypatch.setattr("fastsave.io.direct_file.os.pwritev", failing(os.pwritev))
    return offsets


def aligned_direct_writes(monkeypatch: Any) -> tuple[list[tuple[int, int]], list[int]]:
    """fastsave.io.direct_file's writes, each checked to be one O_DIRECT takes (every memory
    address, length and file offset a multiple of its ALIGN), whatever the filesystem under the
    test allows: files are opened without O_DIRECT but the writer is told it took. Returns the
    (offset, bytes) of each write call and, per writer closed, the bytes it wrote from its callers'
    memory (placed pieces) rather than through its buffers."""
    import os

    import numpy as np

    from fastsave.io import direct_file

    align = direct_file.ALIGN
    calls: list[tuple[int, int]] = []
    in_place: list[int] = []

    def checked(real: Any) -> Any:
        def write(fd: int, data: Any, offset: int) -> int:
            views = [data] if isinstance(data, (memoryview, bytes, bytearray)) else list(data)
            for view in views:
                address = np.frombuffer(view, dtype=np.uint8).ctypes.data
                assert address % align == 0 and len(view) % align == 0, (address % align, len(view))
            assert offset % align == 0, offset
            calls.append((offset, sum(len(view) for view in views)))
            return real(fd, data, offset)

        return write

    def opened(path: Any, direct: bool) -> tuple[int, bool]:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)), True

    real_close = direct_file.AlignedWriter.close

    def counting_close(self: Any) -> None:
        in_place.append(self.in_place_bytes)
        real_close(self)

    monkeypatch.setattr(direct_file.os, "pwrite", checked(os.pwrite))
    monkeypatch.setattr(direct_file.os, "pwritev", checked(os.pwritev))
    monkeypatch.setattr(direct_file, "_open", opened)
    monkeypatch.setattr(direct_file.AlignedWriter, "close", counting_close)
    return calls, in_place


def blas_blocks_with_negative_zeros(monkeypatch: Any, whole_shape: tuple[int, int]) -> None:
    """``torch.mm`` as a BLAS that gives a block computed alone (any product not ``whole_shape``)
    its zeros with the other sign: numbers equal to the whole product's, bits not, so the row
    merge's block checks of factors with zeros in their product fail, deterministically."""
    import torch

    mm = torch.mm

    def mm_of_this_blas(x: Any, y: Any, *, out: Any) -> Any:
        result = mm(x, y, out=out)
        if (x.shape[0], y.shape[1]) != whole_shape:  # a block computed alone
            result.copy_(torch.where(result == 0, torch.full_like(result, -0.0), result))
        return result

    monkeypatch.setattr(torch, "mm", mm_of_this_blas)
