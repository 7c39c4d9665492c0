"""The facts about save_directory that decide how a save lands there, checked before any merge.

:func:`inspect_target` creates nothing. It refuses what can never work (a file, a dangling
symlink, a name longer than the filesystem allows, a directory nobody may write) and picks how
the new checkpoint is switched in:

- ``new``: save_directory does not exist; the staging directory is renamed to it in one step.
- ``exchange``: the staging directory (beside it, on the same filesystem) and save_directory swap
  places in one step (renameat2 RENAME_EXCHANGE); the user's other files are hard-linked in first.
- ``into``: the directory itself must stay (a mount point, the current working directory or one
  of its parents, or a filesystem without RENAME_EXCHANGE): the checkpoint's files are renamed
  in one by one under a journal that the next save completes or rolls back.

A symlinked save_directory is resolved: the directory it points to receives the checkpoint and
the symlink stays as it is.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fastsave.errors import TargetError

NEW, EXCHANGE, INTO = "new", "exchange", "into"
STAGING_PREFIX = ".fastsave-staging-"
LOCK_PREFIX = ".fastsave-lock"
_PATH_MAX = 4096


@dataclass
class SaveTarget:
    """Where and how a save lands."""

    given: Path  # save_directory as the user gave it (absolute)
    path: Path  # the real directory that receives the checkpoint
    exists: bool
    mode: str  # NEW, EXCHANGE or INTO
    reason: str  # why INTO, for the save log
    home: Path  # where the lock and the staging directory go: beside path, or inside it
    tag: str  # 8 hex digits naming this target's lock and staging directories

    @property
    def lock_path(self) -> Path:
        """The lock file of this target."""
        beside = self.home != self.path
        return self.home / (f"{LOCK_PREFIX}-{self.tag}" if beside else LOCK_PREFIX)

    def staging_name(self, suffix: str) -> str:
        """A short name for a staging directory (fits NAME_MAX whatever save_directory's length)."""
        return f"{STAGING_PREFIX}{self.tag}-{suffix}"


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):  # pragma: no cover - platforms without pathconf
        return 255


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def inspect_target(save_directory: str | os.PathLike) -> SaveTarget:
    """Check ``save_directory`` and decide how a checkpoint lands there; creates nothing.

    Raises:
        TargetError: a file, a dangling symlink, a name too long for the filesystem, a directory
            (or missing parent) that cannot be written. Nothing was created.
    """
    given = Path(os.path.abspath(os.path.expanduser(os.fspath(save_directory))))
    if os.path.islink(given) and not os.path.exists(given):
        raise TargetError(
            f"save_directory {str(given)!r} is a symlink to {os.readlink(given)!r}, which does not exist: "
            "create that directory first, or save somewhere else. Nothing was written."
        )
    path = Path(os.path.realpath(given))
    if os.path.exists(path) and not os.path.isdir(path):
        raise TargetError(
            f"save_directory {str(given)!r} exists and is a file, not a directory: choose another path"
        )
    exists = os.path.isdir(path)
    anchor = _nearest_existing(path)
    if not os.path.isdir(anchor):
        raise TargetError(
            f"{str(anchor)!r} is a file, so {str(given)!r} cannot be created: choose another path"
        )
    limit = _name_max(anchor)
    for part in path.relative_to(anchor).parts if path != anchor else ():
        if len(os.fsencode(part)) > limit:
            raise TargetError(
                f"the directory name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; this filesystem "
                f"allows at most {limit}. Choose a shorter name. Nothing was written."
            )
    if len(os.fsencode(str(path))) + 64 > _PATH_MAX:
        raise TargetError(f"save_directory {str(given)[:60]!r}... is too long a path (PATH_MAX {_PATH_MAX})")
    if not _writable(anchor):
        where = (
            f"save_directory {str(path)!r}"
            if anchor == path
            else f"{str(anchor)!r}, where save_directory {str(given)!r} would be created,"
        )
        raise TargetError(
            f"{where} is not writable by this user: fix its permissions or save somewhere else. "
            "Nothing was written."
        )
    tag = hashlib.sha256(os.fsencode(str(path))).hexdigest()[:8]
    parent = path.parent
    if not exists:
        return SaveTarget(given, path, False, NEW, "", parent, tag)
    beside = parent != path and _writable(parent) and not os.path.ismount(path)
    home = parent if beside else path
    reason = ""
    if os.path.ismount(path):
        reason = "it is a mount point"
    elif not _writable(parent):
        reason = f"its parent {str(parent)!r} is not writable"
    else:
        cwd = Path(os.getcwd())
        if cwd == path or path in cwd.parents:
            reason = "it is (or contains) the current working directory"
    return SaveTarget(given, path, True, INTO if reason else EXCHANGE, reason, home, tag)
