"""Refuse a save that cannot fit on disk, before its first byte is written.

A full disk halfway through a 15 GB write is the commonest way a notebook save fails (Kaggle's
/kaggle/working holds 20 GB, Colab's disk fills with checkpoints). The plan knows every output byte
up front, so the check is exact up to headers, small files and filesystem overhead, for which a
margin proportional to the checkpoint is kept (1%, 64 KiB per file, 1 MiB).

An atomic re-save holds the previous and the new checkpoint on one disk until the switch. When the
disk cannot hold both, the save is refused with what is missing, unless the user asked for
``replace_in_place=True``: then the previous checkpoint's weights are deleted before writing (and
the directory holds no complete checkpoint until the new one is in place).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastsave.errors import DiskSpaceError

MARGIN_FRACTION = 0.01
MARGIN_BYTES = 2**20
PER_FILE_BYTES = 64 * 2**10
SMALL_FILES = 12  # config, generation config, index, tokenizer files, card
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def needed_bytes(data_bytes: int, files: int) -> int:
    """Bytes to ask for: the data, a 1% margin, 64 KiB per file (block rounding, headers), 1 MiB."""
    return (
        data_bytes + int(data_bytes * MARGIN_FRACTION) + (files + SMALL_FILES) * PER_FILE_BYTES + MARGIN_BYTES
    )


def _existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**7 else f"{nbytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class Room:
    """What the space check decided: whether the previous weights must go first, and why."""

    delete_previous_first: bool = False
    reason: str = ""


def check_room(
    need: int,
    work_dir: Path,
    staging_dir: Path,
    save_directory: Path,
    previous_bytes: int,
    same_disk: bool,
    replace_in_place: bool,
) -> Room:
    """Decide whether a checkpoint needing ``need`` bytes can be written and switched in.

    ``work_dir`` is where the shards are written, ``staging_dir`` where they are switched in from
    (on save_directory's disk; the same as work_dir unless temporary_location is elsewhere,
    ``same_disk`` False). ``previous_bytes``: the previous checkpoint in save_directory, which an
    atomic switch keeps until the new one is complete.

    Raises:
        DiskSpaceError: with the bytes needed and free, where, and what to do. Nothing was written.
    """
    if not same_disk:
        free_work = free_bytes(work_dir)
        if free_work < need:
            raise DiskSpaceError(
                f"not enough disk space in temporary_location {work_dir.parent}: the checkpoint needs "
                f"about {_gb(need)} there and {_gb(free_work)} is free. Free space there or pass another "
                "temporary_location. Nothing was written."
            )
    free = free_bytes(staging_dir)
    if free >= need:
        return Room()
    missing = need - free
    target = (
        f"{save_directory.parent}"
        if same_disk
        else f"{save_directory.parent} (it is staged elsewhere and copied over)"
    )
    if previous_bytes and free + previous_bytes >= need:
        if replace_in_place:
            return Room(
                True,
                f"replace_in_place=True: the disk holds {_gb(free)} free, the new checkpoint needs about "
                f"{_gb(need)}, so the previous checkpoint's files in {save_directory} ({_gb(previous_bytes)}) "
                "are deleted before writing; until the new checkpoint is complete the directory holds none",
            )
        raise DiskSpaceError(
            f"not enough disk space in {target}: the new checkpoint needs about {_gb(need)}, {_gb(free)} is "
            f"free, and the previous checkpoint in {save_directory} ({_gb(previous_bytes)}) stays until the "
            f"new one is complete, so {_gb(missing)} is missing. Free {_gb(missing)}, save into a directory "
            "on another disk, or pass replace_in_place=True (command line: --replace-in-place) to delete "
            "the previous checkpoint's weights first: if that save then fails, the directory holds no "
            "checkpoint. Nothing was written."
        )
    raise DiskSpaceError(
        f"not enough disk space in {target}: the checkpoint needs about {_gb(need)} and {_gb(free)} is free, "
        f"so {_gb(missing)} is missing"
        + (
            f" (deleting the previous checkpoint would free only {_gb(previous_bytes)})"
            if previous_bytes
            else ""
        )
        + ". Free space there or save to another disk. Nothing was written."
    )


def full_disk_error(directory: Path, remaining: int) -> DiskSpaceError:
    """The DiskSpaceError for ENOSPC while writing into ``directory``, ``remaining`` bytes still to write."""
    return DiskSpaceError(
        f"the disk holding {directory.parent} filled up while the checkpoint was written: about "
        f"{_gb(max(remaining, 0))} of tensor data (plus headers and small files) was still to be written. "
        "Nothing was published: the save directory keeps its previous contents. Free that much space, or "
        "save to another disk."
    )


def check_free_space(directory: Path, data_bytes: int, files: int) -> None:
    """Refuse a checkpoint of ``data_bytes`` in ``files`` weight files that ``directory``'s disk
    cannot hold (for a directory that no pending save owns; a pending save checks more).

    Raises:
        DiskSpaceError: with what is needed and free, where, and what to do.
    """
    check_room(needed_bytes(data_bytes, files), directory, directory, directory, 0, True, False)
