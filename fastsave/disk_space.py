"""Refuse a save that cannot fit on disk, before its first byte is written.

A full disk halfway through a 15 GB write is the commonest way a notebook save fails (Kaggle's
/kaggle/working holds 20 GB, Colab's disk fills with checkpoints). The plan knows every output byte
up front, so the check is exact up to headers and small files, for which a margin is kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastsave.errors import DiskSpaceError
from fastsave.writer import STALE_PATTERNS, same_filesystem

# safetensors headers, index, config and tokenizer files, and filesystem block rounding
_MARGIN_FRACTION = 0.01
_MARGIN_BYTES = 64 * 2**20


def _needed(nbytes: int) -> int:
    return nbytes + int(nbytes * _MARGIN_FRACTION) + _MARGIN_BYTES


def _replaced_bytes(save_directory: Path) -> int:
    if not save_directory.is_dir():
        return 0
    total = 0
    for pattern in STALE_PATTERNS:  # publish() deletes or overwrites these
        for path in save_directory.glob(pattern):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def check_free_space(nbytes: int, staging: Path, save_directory: Path) -> None:
    """Raise DiskSpaceError when ``nbytes`` of checkpoint cannot be written and published.

    The checkpoint is written into ``staging`` and then moved to ``save_directory``: on the same
    filesystem that is a rename (the space is needed once, in staging); on another one the move
    copies, so the destination needs room too, less what the move replaces there.
    """
    free_staging = shutil.disk_usage(staging).free
    need = _needed(nbytes)
    if free_staging < need:
        raise DiskSpaceError(
            f"not enough disk space: the checkpoint needs about {_gb(need)} in {staging.parent} "
            f"(where it is staged before moving into {save_directory}), and {_gb(free_staging)} is free. "
            "Free space there, or pass temporary_location= a directory on a disk with room, or save "
            "to another disk. Nothing was written."
        )
    destination = _existing_parent(save_directory)
    if same_filesystem(destination, staging):
        return
    free_destination = shutil.disk_usage(destination).free + _replaced_bytes(save_directory)
    if free_destination < need:
        raise DiskSpaceError(
            f"not enough disk space: the checkpoint needs about {_gb(need)} in {destination} (it is "
            f"staged in {staging.parent}, on another disk, and copied over), and {_gb(free_destination)} "
            "is free there. Free space there, or save to another disk. Nothing was written."
        )
