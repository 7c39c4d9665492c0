"""The system calls an atomic save needs: renameat2, hard-linked trees, durable renames.

Linux's ``renameat2(RENAME_EXCHANGE)`` swaps two paths in one step (ext4, xfs, btrfs, tmpfs and
most others; not every network filesystem). glibc exposes it since 2.28; older ones get the raw
system call. Where neither works, callers fall back to a journaled rename sequence.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# __NR_renameat2 per architecture, for a libc without the wrapper
_SYSCALL_NUMBERS = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
# errors that mean "this kernel or filesystem cannot do that rename", not "that rename failed"
UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


def _libc_renameat2():
    if platform.system() != "Linux":
        return None, None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc loadable
        return None, None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function, None
    number = _SYSCALL_NUMBERS.get(platform.machine())
    return None, (libc.syscall, number) if number is not None else None


_RENAMEAT2, _SYSCALL = _libc_renameat2()


def renameat2(source: str | os.PathLike, destination: str | os.PathLike, flags: int) -> None:
    """``renameat2(AT_FDCWD, source, AT_FDCWD, destination, flags)``; OSError on failure.

    Raises:
        OSError: ENOSYS where the platform has no renameat2, EINVAL where the filesystem does not
            support ``flags``; otherwise whatever the kernel says (EEXIST, EXDEV, EBUSY, ...).
    """
    src, dst = os.fsencode(source), os.fsencode(destination)
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(AT_FDCWD, src, AT_FDCWD, dst, flags)
    elif _SYSCALL is not None:
        syscall, number = _SYSCALL
        result = syscall(
            ctypes.c_long(number),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(src),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(dst),
            ctypes.c_uint(flags),
        )
    else:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this platform", str(source))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(destination))


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE)."""
    renameat2(a, b, RENAME_EXCHANGE)


def rename_noreplace(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``, failing (EEXIST) rather than replacing anything there."""
    try:
        renameat2(source, destination, RENAME_NOREPLACE)
    except OSError as error:
        if error.errno not in UNSUPPORTED_ERRNOS:
            raise
        # No RENAME_NOREPLACE here: check, then rename (the save's lock keeps other fastsave
        # saves out of the gap; a directory is only replaced by rename(2) when it is empty).
        if os.path.lexists(destination):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination)) from None
        os.rename(source, destination)


def fsync_directory(path: Path) -> None:
    """Make the entries of ``path`` (renames, new files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - not a directory we can open (some network filesystems)
        return
    try:
        os.fsync(fd)
    except OSError as error:  # pragma: no cover - directories that do not support fsync
        if error.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether moving from one path to the other is a rename (no copy, no extra space)."""
    return os.stat(a).st_dev == os.stat(b).st_dev


class CrossDeviceEntry(OSError):
    """An entry of the tree sits on another filesystem (a mount point): it cannot be hard-linked."""


def link_tree(source: Path, destination: Path, names: Iterable[str]) -> list[str]:
    """Recreate ``source/name`` at ``destination/name`` for each name, sharing every file's inode.

    Files (of any type) and symlinks are hard-linked (same bytes, same inode, no space, no time);
    directories are recreated with their mode and times and filled recursively. Returns the names
    linked, in order, so that a caller can undo a partial link.

    Raises:
        CrossDeviceEntry: a sub-directory is a mount point of another filesystem.
        OSError: a file cannot be hard-linked (EPERM under fs.protected_hardlinks, EMLINK, ...).
    """
    done = []
    device = os.stat(source).st_dev
    for name in names:
        _link_entry(source / name, destination / name, device)
        done.append(name)
    return done


def _link_entry(source: Path, destination: Path, device: int) -> None:
    info = os.lstat(source)
    if not stat.S_ISDIR(info.st_mode):
        os.link(source, destination, follow_symlinks=False)  # a symlink is linked as the symlink
        return
    if info.st_dev != device:
        raise CrossDeviceEntry(errno.EXDEV, "a mount point inside the directory", str(source))
    os.mkdir(destination)
    for child in os.listdir(source):
        _link_entry(source / child, destination / child, device)
    copy_directory_metadata(info, destination)


def copy_directory_metadata(info: os.stat_result, destination: Path) -> None:
    """Give ``destination`` the mode, owner (where permitted) and times of the directory ``info``."""
    os.chmod(destination, stat.S_IMODE(info.st_mode))
    if hasattr(os, "chown") and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(PermissionError):  # only root may give a directory away
            os.chown(destination, info.st_uid, info.st_gid)
    os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def apply_umask_modes(directory: Path) -> None:
    """Give the files a save wrote the modes the user's umask asks for (safetensors writes 0600).

    Call it before the user's own files are linked into ``directory``: their modes are theirs.
    """
    umask = current_umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def remove_tree(path: Path) -> None:
    """Remove a file, symlink or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
