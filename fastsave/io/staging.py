"""A pending save: its lock, its staging directory, the cleanup of dead ones, its room on disk.

:class:`PendingSave` is what ``fastsave.pipeline.preflight.Preflight`` holds while a checkpoint is
written: :meth:`~PendingSave.prepare` (before any merge) checks save_directory, takes its lock,
finishes or undoes what an interrupted save left there, removes the staging directories of dead
saves (with a message) and makes a fresh one; :meth:`~PendingSave.check_space` (once the plan's
size is known, still before merging) refuses a checkpoint that cannot fit, or deletes the
previous one first when the user asked for ``replace_in_place``; :meth:`~PendingSave.publish`
verifies the staged checkpoint and switches it in; :meth:`~PendingSave.close` removes whatever
the save created and did not publish (staging, parents it made, a temporary_location it made)
and releases the lock, on success, error or Ctrl-C alike.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from fastsave.errors import TargetError, VerifyError
from fastsave.io import switch
from fastsave.io.disk_space import Room, check_room, needed_bytes
from fastsave.io.filesystem import (
    apply_umask_modes,
    exchange,
    fsync_directory,
    fsync_file,
    remove_tree,
    same_filesystem,
)
from fastsave.io.lock import DirectoryLock, OwnerRecord, try_lock_dead
from fastsave.io.ownership import (
    ADAPTER_CONFIG,
    check_kinds_do_not_mix,
    kind_of,
    plan_replacement,
    previous_checkpoint,
)
from fastsave.io.target import EXCHANGE, INTO, LOCK_PREFIX, NEW, STAGING_PREFIX, SaveTarget, inspect_target
from fastsave.io.verify import verify_checkpoint

logger = logging.getLogger(__name__)

# A staging directory with no lock file naming it was left by an older fastsave (or its lock was
# deleted by hand); one this old is not being written any more.
ORPHAN_AGE_SECONDS = 60


class PendingSave:
    """One save into one directory, from its checks to its switch (see the module docstring)."""

    def __init__(
        self,
        save_directory: Path,
        save_method: str,
        temporary_location: Path | None = None,
        replace_in_place: bool = False,
        kind: str | None = None,
        variant: str | None = None,
    ) -> None:
        self.kind = kind or kind_of(save_method)
        self.variant = variant  # transformers' variant= of the weight files: replaced per variant
        self.target: SaveTarget = inspect_target(save_directory)
        self.temporary_location = temporary_location
        self.replace_in_place = replace_in_place
        self.lock = DirectoryLock(self.target.lock_path)
        self.record = OwnerRecord(target=str(self.target.path))
        self.staging: Path | None = None  # on save_directory's filesystem: what is switched in
        self.work: Path | None = None  # where the writer writes (staging, or in temporary_location)
        self.created: list[Path] = []  # directories this save created, outermost first
        self.published = False
        self.switch_mode = self.target.mode
        self.how = ""  # how the checkpoint was published, for the save log

    # ------------------------------------------------------------------ before merging

    def prepare(self) -> Path:
        """Check, lock, clean up, and make the staging directory; returns where to write.

        Raises:
            TargetError / MixedKindsError: save_directory cannot take this save (nothing created).
            SaveInProgressError: another save into it is running.
        """
        target = self.target
        if target.exists:
            check_kinds_do_not_mix(target.path, self.kind)
        self._make_directory(target.home)
        try:
            self.lock.acquire(self.record)
        except OSError as error:
            raise TargetError(
                f"cannot write in {target.home}: {error.strerror or error}. Nothing was written."
            ) from None
        self._clean_up_after_dead_saves()
        self.staging = target.home / target.staging_name(uuid.uuid4().hex[:4])
        os.mkdir(self.staging)
        self.record.staging.append(str(self.staging))
        self.lock.write(self.record)
        if self.switch_mode == EXCHANGE and not _exchange_works(self.staging):
            self._fall_back("this filesystem has no atomic directory exchange (renameat2 RENAME_EXCHANGE)")
        self.work = self.staging
        if self.temporary_location is not None:
            self._make_directory(self.temporary_location)
            self.work = self.temporary_location / target.staging_name(uuid.uuid4().hex[:4])
            os.mkdir(self.work)
            self.record.staging.append(str(self.work))
            self.lock.write(self.record)
        return self.work

    def _make_directory(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
        for directory in reversed(missing):
            os.mkdir(directory)
            self.created.append(directory)

    def _fall_back(self, reason: str) -> None:
        self.switch_mode = INTO
        self.target.reason = reason

    def _clean_up_after_dead_saves(self) -> None:
        target = self.target
        if target.exists:
            message = switch.recover(target.path)
            if message:
                self._say(f"an earlier save was interrupted: {message}")
        dead = self.lock.previous  # our lock file still held the record of a save that died
        if dead is not None:
            self._clean_dead_record(dead)
        places = [target.home] + ([target.path] if target.exists and target.path != target.home else [])
        for name in sorted(os.listdir(target.home)):  # locks of other targets whose saves died
            path = target.home / name
            if name.startswith(LOCK_PREFIX + "-") and path != self.lock.path:
                other = try_lock_dead(path)
                if other is not None:
                    if other.previous is not None:
                        self._clean_dead_record(other.previous)
                    other.release()
        for place in places:
            for name in sorted(os.listdir(place)):
                path = place / name
                if name.startswith(STAGING_PREFIX) and path.is_dir() and self._is_dead_staging(place, name):
                    remove_tree(path)
                    self._say(f"removed {path}, left by a save that did not finish")
                elif name.startswith(switch.BACKUP_PREFIX) and place == target.path:
                    remove_tree(path)  # recover() handled any journal: a backup without one is spent
                    self._say(f"removed {path}, left by a save that did not finish")
        if self.temporary_location is not None and self.temporary_location.is_dir():
            # other saves may stage here too, with their locks elsewhere: only ours are known dead
            for path in self.temporary_location.glob(f"{STAGING_PREFIX}{target.tag}-*"):
                remove_tree(path)
                self._say(f"removed {path}, left by a save that did not finish")

    def _is_dead_staging(self, place: Path, name: str) -> bool:
        tag = name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if tag == self.target.tag:
            return True  # we hold this target's lock: no live save owns it
        if (place / f"{LOCK_PREFIX}-{tag}").exists():
            return False  # a live save's (dead ones were cleaned above)
        # no lock names it: an older fastsave's, or its lock was removed by hand
        return time.time() - os.lstat(place / name).st_mtime > ORPHAN_AGE_SECONDS

    def _clean_dead_record(self, record: OwnerRecord) -> None:
        target = Path(record.target)
        for raw in record.staging:
            path = Path(raw)
            if not path.name.startswith(STAGING_PREFIX) or not path.is_dir():
                continue  # only ever remove what fastsave names as its own
            switched = record.phase == "switched" or (
                record.phase == "switching"
                and target.is_dir()
                and os.stat(target).st_ino == record.staging_inode
            )
            if switched and target.is_dir():
                # the old tree of a finished exchange: give back what the user changed meanwhile
                switch.finish_exchange(path, target, record.previous, record.new)
            else:
                remove_tree(path)
            self._say(f"removed {path}, left by a save that did not finish ({record.describe()})")

    def _say(self, message: str) -> None:
        logger.info("fastsave: %s", message)

    def check_space(self, data_bytes: int, files: int) -> None:
        """Refuse a checkpoint of ``data_bytes`` in ``files`` weight files that cannot fit (before merging).

        With ``replace_in_place`` and no room for both, the previous checkpoint is deleted now.

        Raises:
            DiskSpaceError: what is needed and free, where, and what to do. Nothing was written.
        """
        previous = (
            previous_checkpoint(self.target.path, self.kind, variant=self.variant)
            if self.target.exists
            else []
        )
        previous_bytes = sum(_freed_bytes(self.target.path / n) for n in previous)
        room: Room = check_room(
            needed_bytes(data_bytes, files),
            self.work,
            self.staging,
            self.target.given,
            previous_bytes,
            same_filesystem(self.work, self.staging),
            self.replace_in_place,
        )
        if room.delete_previous_first:
            logger.warning("fastsave: %s", room.reason)
            for name in sorted(previous, key=lambda n: n not in ("config.json", ADAPTER_CONFIG)):
                remove_tree(self.target.path / name)
            fsync_directory(self.target.path)

    # ------------------------------------------------------------------ the switch

    def publish(self) -> None:
        """Verify the staged checkpoint and switch it into save_directory.

        Raises:
            VerifyError: the staged checkpoint does not read back (nothing switched).
            TargetError: a new sub-folder would overwrite a user's folder (nothing switched).
        """
        if self.published:
            raise RuntimeError("this save is already published")
        staging, target = self.staging, self.target
        if self.work != staging:
            _move_contents(self.work, staging)
        report = verify_checkpoint(staging, kind=self.kind)
        if not report.ok:
            raise VerifyError(
                "the staged checkpoint does not read back as written: " + "; ".join(report.problems)
            )
        apply_umask_modes(staging)
        _fsync_files(staging)
        fsync_directory(staging)
        if not target.path.is_dir():
            switch.rename_new(staging, target.path)
            self._published("written")
            return
        replacement = plan_replacement(target.path, self.kind, staging, self.variant)
        if replacement.conflicts:
            raise TargetError(
                f"the new checkpoint would replace {', '.join(replacement.conflicts)} in {target.path}, which "
                "hold(s) other files; save into another directory. Nothing was changed."
            )
        for name in replacement.keep_user:
            remove_tree(staging / name)
            self._say(
                f"kept your {name} in {target.path} (it is not one fastsave wrote); the new one was left out"
            )
        new = sorted(os.listdir(staging))
        if self.switch_mode in (NEW, EXCHANGE):
            keep = [n for n in sorted(os.listdir(target.path)) if n not in replacement.remove]
            try:
                switch.link_user_files(target.path, staging, keep)
                self.record.phase, self.record.previous, self.record.new = (
                    "switching",
                    replacement.remove,
                    new,
                )
                self.record.staging_inode = os.stat(staging).st_ino
                self.lock.write(self.record)
                switch.exchange_directories(staging, target.path)
            except switch.SwitchUnsupported as why:
                for name in keep:
                    if os.path.lexists(staging / name):
                        remove_tree(staging / name)
                self.record.phase = "writing"
                self._fall_back(f"the exchange was not possible ({why})")
            else:
                self._published("switched in atomically (renameat2 RENAME_EXCHANGE)")
                try:
                    fsync_directory(target.path.parent)
                    self.record.phase = "switched"
                    self.lock.write(self.record)
                except OSError as error:  # the switch is done; the record only helps a later cleanup
                    logger.warning("fastsave: %s", error)
                switch.finish_exchange(staging, target.path, replacement.remove, new)
                return
        self.lock.write(self.record)
        switch.switch_into(staging, target.path, replacement.remove)
        self._published(f"renamed into place file by file under a journal, because {target.reason}")

    def _published(self, how: str) -> None:
        self.published = True
        self.how = f"{how}: {self.target.path}"

    # ------------------------------------------------------------------ afterwards

    def close(self) -> None:
        """Remove what the save created and did not publish; release the lock. Never raises OSError.

        A staging directory that a journal still names is left for the next save's recovery.
        """
        try:
            journal_pending = self.target.path.is_dir() and switch.read_journal(self.target.path) is not None
            for path in {self.work, self.staging} - {None}:
                if os.path.lexists(path) and not (journal_pending and path == self.staging):
                    remove_tree(path)
            if self.temporary_location is not None and self.temporary_location in self.created:
                _remove_if_empty([self.temporary_location])
        except OSError as error:
            logger.warning(
                "fastsave: could not remove %s (%s); the next save removes it", self.staging, error
            )
        try:
            self.lock.release()
        except OSError as error:  # a stale lock file is taken over by the next save
            logger.warning("fastsave: could not remove the lock file %s (%s)", self.lock.path, error)
        if not self.published:
            _remove_if_empty([p for p in reversed(self.created) if p != self.temporary_location])


def _exchange_works(staging: Path) -> bool:
    """Probe RENAME_EXCHANGE on save_directory's filesystem, inside the fresh staging directory."""
    a, b = staging / ".probe-a", staging / ".probe-b"
    os.mkdir(a)
    os.mkdir(b)
    try:
        exchange(a, b)
        return True
    except OSError:
        return False
    finally:
        os.rmdir(a)
        os.rmdir(b)


def _freed_bytes(path: Path) -> int:
    """Disk space deleting ``path`` gives back (files linked elsewhere too free nothing)."""
    total = 0
    for root, _, files in (
        os.walk(path) if path.is_dir() and not path.is_symlink() else [(path.parent, [], [path.name])]
    ):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if info.st_nlink == 1:
                total += info.st_blocks * 512 if hasattr(info, "st_blocks") else info.st_size
    return total


def _move_contents(source: Path, destination: Path) -> None:
    """Move every entry of ``source`` into ``destination`` (copying across filesystems), then remove it."""
    if same_filesystem(source, destination):
        for name in os.listdir(source):
            os.rename(source / name, destination / name)
        os.rmdir(source)
        return
    for name in os.listdir(source):
        if (source / name).is_dir():
            shutil.copytree(source / name, destination / name)
        else:
            shutil.copy2(source / name, destination / name)
    for root, _, files in os.walk(destination):  # a copy is not on disk until synced
        for name in files:
            fsync_file(Path(root) / name)
    remove_tree(source)


def _fsync_files(directory: Path) -> None:
    """Every staged file on disk before the switch (the shards, synced when closed, cost nothing more)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_file(Path(root) / name)


def _remove_if_empty(paths: list[Path]) -> None:
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            return
