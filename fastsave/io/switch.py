"""The switch mechanics: a finished staging directory becomes save_directory's content in one step.

The decision to switch (after verifying the staged files) is fastsave.io.staging's
:meth:`PendingSave.publish`; this module only moves files, and recovers an interrupted switch.

``exchange``: the staging directory already holds the user's other files (hard links: same
inodes, no space, no time) and swaps places with save_directory through renameat2
RENAME_EXCHANGE. Before the swap save_directory is entirely the old one, after it entirely the
new one. The old tree then sits at the staging path; anything the user created or replaced in
save_directory while the save ran is moved back (:func:`reconcile`), and the rest is removed.

``into`` (mount points, the working directory, filesystems without RENAME_EXCHANGE): the
checkpoint's files are renamed in one by one, the old ones into a backup folder first, under a
journal (``.fastsave-journal.json``) written before the first rename and marked ``switched``
after the last. Every state in between is recognised by :func:`recover`: rolled back before the
mark, completed after it. config.json (adapter_config.json) goes out first and comes in last, so
a half-switched directory never loads as a model.

``new``: save_directory did not exist; the staging directory is renamed to it (RENAME_NOREPLACE).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import uuid
from pathlib import Path

from fastsave.io.filesystem import (
    UNSUPPORTED_ERRNOS,
    CrossDeviceEntry,
    copy_directory_metadata,
    exchange,
    fsync_directory,
    link_tree,
    remove_tree,
    rename_noreplace,
)

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".fastsave-journal.json"
BACKUP_PREFIX = ".fastsave-backup-"
# written last, removed first: a directory without them does not load as a checkpoint
_CONFIG_NAMES = ("config.json", "adapter_config.json")


# --------------------------------------------------------------------------- exchange


class SwitchUnsupported(Exception):
    """The exchange cannot be done here (no RENAME_EXCHANGE, a mount point inside, a file that
    cannot be hard-linked); the caller switches ``into`` instead. Nothing was changed."""


def link_user_files(directory: Path, staging: Path, keep: list[str]) -> None:
    """Hard-link the entries ``keep`` of ``directory`` into ``staging`` (undone on failure).

    Raises:
        SwitchUnsupported: an entry cannot be linked (the links made so far are removed).
    """
    try:
        link_tree(directory, staging, keep)
    except (CrossDeviceEntry, OSError) as error:
        for name in keep:
            if os.path.lexists(staging / name):
                remove_tree(staging / name)
        raise SwitchUnsupported(f"{error.filename}: {error.strerror or error}") from error
    copy_directory_metadata(os.stat(directory), staging)
    fsync_directory(staging)


def exchange_directories(staging: Path, directory: Path) -> None:
    """Swap ``staging`` and ``directory``.

    Raises:
        SwitchUnsupported: the filesystem cannot (EINVAL, ENOSYS, ...), a mount point (EBUSY, EXDEV),
            or no permission to move save_directory itself (EPERM, EACCES).
    """
    try:
        exchange(staging, directory)
    except OSError as error:
        # EPERM/EACCES: a sticky parent (/tmp) lets only a directory's owner rename it
        if error.errno in UNSUPPORTED_ERRNOS or error.errno in (
            errno.EBUSY,
            errno.EXDEV,
            errno.EPERM,
            errno.EACCES,
        ):
            raise SwitchUnsupported(f"renameat2(RENAME_EXCHANGE): {error.strerror}") from error
        raise


KEPT_PREFIX = ".fastsave-kept-"


def _real_dir(path: Path) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _same_inode(a: Path, b: Path) -> bool:
    x, y = os.lstat(a), os.lstat(b)
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def reconcile(
    old_tree: Path, directory: Path, previous: list[str], new: list[str]
) -> tuple[list[str], list[str]]:
    """After an exchange: move back what the user created or replaced during the save.

    ``old_tree`` is the old save_directory (now at the staging path); ``previous`` the top-level
    names of the replaced checkpoint (they stay behind to be removed); ``new`` the new
    checkpoint's top-level names. Every other entry was hard-linked into the new directory, so an
    entry whose inode is not there was created or replaced while the save ran: it is moved into
    ``directory``. Returns (moved, conflicts): conflicts are entries that collide with a file of
    the new checkpoint, or a file with a directory; they stay in the old tree.
    """
    moved: list[str] = []
    conflicts: list[str] = []
    skip, ours = set(previous), set(new)

    def walk(old: Path, current: Path, relative: str) -> None:
        for name in sorted(os.listdir(old)):
            if not relative and name in skip:
                continue
            here, there, rel = old / name, current / name, relative + name
            if _real_dir(here) and _real_dir(there):
                walk(here, there, rel + "/")
                continue
            if not os.path.lexists(there):
                os.rename(here, there)
                moved.append(rel)
            elif _same_inode(here, there):
                continue
            elif _real_dir(here) or _real_dir(there) or (not relative and name in ours):
                conflicts.append(rel)
            else:  # replaced by the user after it was linked: the user's version wins
                os.replace(here, there)
                moved.append(rel)

    walk(old_tree, directory, "")
    return moved, conflicts


def finish_exchange(old_tree: Path, directory: Path, previous: list[str], new: list[str]) -> None:
    """Reconcile and remove the old tree; problems are logged, never raised (the switch is done)."""
    try:
        moved, conflicts = reconcile(old_tree, directory, previous, new)
        if moved:
            logger.info(
                "fastsave: kept %d file(s) changed in %s while saving: %s",
                len(moved),
                directory,
                ", ".join(moved),
            )
        if conflicts:
            kept = old_tree.with_name(
                KEPT_PREFIX + old_tree.name.rsplit("-", 2)[-2] + "-" + uuid.uuid4().hex[:4]
            )
            os.rename(old_tree, kept)
            logger.warning(
                "fastsave: %s changed while saving in ways that collide with the new checkpoint (%s); the "
                "previous contents are kept in %s: take what you need and delete it",
                directory,
                ", ".join(conflicts),
                kept,
            )
            return
        remove_tree(old_tree)
    except OSError as error:
        logger.warning(
            "fastsave: the new checkpoint is in place, but the previous one could not be fully removed "
            "from %s (%s); the next save into %s removes it",
            old_tree,
            error,
            directory,
        )


# --------------------------------------------------------------------------- journaled rename sequence


def _write_journal(directory: Path, journal: dict) -> None:
    temporary = directory / (JOURNAL_NAME + ".tmp")
    try:
        with open(temporary, "w") as handle:
            json.dump(journal, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, directory / JOURNAL_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def read_journal(directory: Path) -> dict | None:
    """The journal of an interrupted ``into`` switch in ``directory``, if any."""
    try:
        journal = json.loads((directory / JOURNAL_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"phase": "unreadable"}
    return journal if isinstance(journal, dict) else {"phase": "unreadable"}


def switch_into(staging: Path, directory: Path, previous: list[str]) -> None:
    """Rename the staged entries into ``directory`` under a journal; roll back on any error."""
    new = sorted(os.listdir(staging), key=lambda n: (n in _CONFIG_NAMES, n))  # configs last
    old = sorted(previous, key=lambda n: (n not in _CONFIG_NAMES, n))  # configs first
    backup = directory / f"{BACKUP_PREFIX}{uuid.uuid4().hex[:4]}"
    journal = {
        "staging": os.path.relpath(staging, directory),
        "backup": backup.name,
        "previous": old,
        "new": new,
        "phase": "switching",
    }
    _write_journal(directory, journal)
    try:
        os.mkdir(backup)
        for name in old:
            os.rename(directory / name, backup / name)
        for name in new:
            os.rename(staging / name, directory / name)
        fsync_directory(directory)
        journal["phase"] = "switched"
        _write_journal(directory, journal)
    except BaseException:
        _roll_back(directory, journal)
        raise
    try:
        _complete(directory, journal)
    except OSError as error:  # the new checkpoint is in place; the journal lets the next save tidy up
        logger.warning(
            "fastsave: the new checkpoint is in place in %s, but %s and the previous files in %s could not "
            "be removed (%s); the next save into it removes them",
            directory,
            JOURNAL_NAME,
            journal["backup"],
            error,
        )


def _paths(directory: Path, journal: dict) -> tuple[Path, Path]:
    staging = Path(os.path.normpath(directory / journal["staging"]))
    backup = directory / journal["backup"]
    if not staging.name.startswith(".fastsave-staging-") or not backup.name.startswith(BACKUP_PREFIX):
        raise ValueError(f"{directory / JOURNAL_NAME} names paths fastsave does not make")
    return staging, backup


def _roll_back(directory: Path, journal: dict) -> None:
    staging, backup = _paths(directory, journal)
    previous = set(journal["previous"])
    os.makedirs(staging, exist_ok=True)
    for name in journal["new"]:
        here = directory / name
        # in place and not an old file still waiting to be moved out: it is a new one
        if os.path.lexists(here) and (name not in previous or os.path.lexists(backup / name)):
            os.rename(here, staging / name)
    for name in journal["previous"]:
        if os.path.lexists(backup / name):
            os.rename(backup / name, directory / name)
    fsync_directory(directory)
    os.unlink(directory / JOURNAL_NAME)
    fsync_directory(directory)
    if os.path.isdir(backup):
        remove_tree(backup)


def _complete(directory: Path, journal: dict) -> None:
    staging, backup = _paths(directory, journal)
    remove_tree(backup)
    remove_tree(staging)
    os.unlink(directory / JOURNAL_NAME)
    fsync_directory(directory)


def recover(directory: Path) -> str | None:
    """Finish or undo an interrupted ``into`` switch in ``directory``; a message saying which, or None.

    Before the journal's ``switched`` mark the previous checkpoint is restored (the staged one is
    removed), after it the new one is kept. Safe to run again after being interrupted itself.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / (JOURNAL_NAME + ".tmp"))  # a journal being written when the save died
    journal = read_journal(directory)
    if journal is None:
        return None
    if journal.get("phase") == "switched":
        _complete(directory, journal)
        return f"completed an interrupted switch in {directory}: it holds the checkpoint that save wrote"
    if journal.get("phase") == "switching":
        _roll_back(directory, journal)
        staging, _ = _paths(directory, journal)
        remove_tree(staging)
        return f"rolled back an interrupted switch in {directory}: it holds its previous checkpoint again"
    raise ValueError(
        f"{directory / JOURNAL_NAME} is unreadable: an interrupted save left {directory} mid-switch; "
        "look at its .fastsave-backup-* folder (the previous checkpoint's files) before removing the journal"
    )


# --------------------------------------------------------------------------- new directory


def rename_new(staging: Path, directory: Path) -> None:
    """Give the staging directory save_directory's name (which must not exist)."""
    rename_noreplace(staging, directory)
    fsync_directory(directory.parent)
