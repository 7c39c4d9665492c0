"""sha256 of each shard's data, computed while it is written and recorded inside the shard.

Where the digest lives: in the safetensors header's ``__metadata__`` of every shard fastsave
writes (key :data:`SHA256_KEY`), and, for a sharded save, also in the index's ``metadata``. A
fixed-length placeholder is written with the header and patched in place once the data is
written (the header's length does not change). So every shard checks itself, also when copied or
downloaded alone, and a single-file save needs no extra file. The digest covers the data section
(every byte after the header); the header itself is checked by parsing it against the file size
and the index (``fastsave verify``).

The hashing runs on a worker thread, in write order, beside the writer: ``hashlib`` releases the
GIL on buffers over 2 KiB, so on two cores it overlaps the merge and the write.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

SHA256_KEY = "fastsave_sha256"
PLACEHOLDER = "0" * 64
_READ_CHUNK = 8 * 2**20


class BackgroundDigest:
    """sha256 of buffers handed over in order, hashed on one worker thread.

    At most ``max_pending`` buffers wait; each is kept alive (with its owner, e.g. the tensor)
    until it is hashed.
    """

    def __init__(self, max_pending: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsave-sha256")
        self._pending: deque[tuple[Future, Any]] = deque()
        self._max_pending = max_pending
        self._hash = hashlib.sha256()

    def restart(self) -> None:
        """Begin a new digest (the previous one must have been read)."""
        self._drain()
        self._hash = hashlib.sha256()

    def update(self, data: memoryview, owner: Any = None) -> None:
        """Hash ``data`` after everything handed over before it."""
        if len(data) == 0:
            return
        self._pending.append((self._executor.submit(self._hash.update, data), owner))
        while len(self._pending) > self._max_pending:
            self._pending.popleft()[0].result()

    def hexdigest(self) -> str:
        """The digest of everything handed over since the last restart."""
        self._drain()
        return self._hash.hexdigest()

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()

    def close(self) -> None:
        """Stop the worker thread (pending buffers are dropped)."""
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)


def data_digest(path: Path) -> str:
    """sha256 of the data section of a safetensors file (every byte after its header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length)
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
