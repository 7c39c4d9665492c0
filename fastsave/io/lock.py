"""One save per directory: an flock on a small file that also holds the save's owner record.

(Windows: msvcrt's byte-range lock, which its process's death drops too; untested here.)

The lock file sits beside save_directory (inside it where its parent is not writable). The kernel
drops an flock when its process dies, however it dies, so a lock that can be taken belongs to
nobody: its record (pid, host, start time, staging directories, phase) then tells the next save
what a dead save left behind. The file is unlinked while still locked, and a lock taken on a file
that was meanwhile unlinked or replaced is retried, so two saves never both hold it.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastsave.errors import SaveInProgressError

try:
    import fcntl
except ImportError:  # Windows: a byte-range lock, also dropped when its process dies
    fcntl = None
    import msvcrt

_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _lock_now(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


@dataclass
class OwnerRecord:
    """Who holds (or held) a lock, and what its save had on disk."""

    target: str  # save_directory's real path
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    staging: list[str] = field(default_factory=list)  # absolute paths this save created
    # "writing": the staging directory holds the new checkpoint; "switching": it is being exchanged
    # with the target (the inode tells which tree is where); "switched": it holds the old tree
    phase: str = "writing"
    staging_inode: int = 0  # inode of the staging directory (the new tree) once phase is "switching"
    previous: list[str] = field(default_factory=list)  # top-level names of the replaced checkpoint
    new: list[str] = field(default_factory=list)  # top-level names of the new checkpoint

    def describe(self) -> str:
        """'pid 123 on host h, started 2025-01-01T10:00:00'."""
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    @classmethod
    def from_bytes(cls, raw: bytes) -> OwnerRecord | None:
        """The record in a lock file, or None for an empty or unreadable one."""
        try:
            data = json.loads(raw.decode("utf-8"))
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None


class DirectoryLock:
    """An exclusive, non-blocking flock on ``path``; the owner record is kept in the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.previous: OwnerRecord | None = None  # what a dead holder left in the file, if anything

    def acquire(self, record: OwnerRecord) -> None:
        """Take the lock now or fail.

        Raises:
            SaveInProgressError: another process holds it (its record is in the message).
        """
        while True:
            fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT, 0o644)
            try:
                locked = _lock_now(fd)
            except OSError:
                os.close(fd)
                raise
            if not locked:
                holder = OwnerRecord.from_bytes(_read_all(fd))
                os.close(fd)
                who = holder.describe() if holder else "another process"
                raise SaveInProgressError(
                    f"another save into {record.target!r} is running ({who}); this save did nothing. "
                    f"Wait for it to finish (or stop it), then save again. Lock file: {self.path}"
                )
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder unlinked it as we opened it: take the new one
        self._fd = fd
        raw = _read_all(fd)
        self.previous = OwnerRecord.from_bytes(raw) if raw else None
        self.write(record)

    def write(self, record: OwnerRecord) -> None:
        """Replace the owner record (the lock must be held)."""
        data = json.dumps(asdict(record), indent=1).encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def release(self) -> None:
        """Unlink the lock file and drop the lock (in that order, see the module docstring)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None


def try_lock_dead(path: Path) -> DirectoryLock | None:
    """Take the lock at ``path`` if its owner is gone (returns it, holding the dead owner's record)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        locked = _lock_now(fd)
    except OSError:
        locked = False
    if not locked:
        os.close(fd)
        return None  # alive
    if not _same_file(fd, path):
        os.close(fd)
        return None
    lock = DirectoryLock(path)
    lock._fd = fd
    lock.previous = OwnerRecord.from_bytes(_read_all(fd))
    return lock


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
