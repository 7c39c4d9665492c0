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
