"""Disk space: refused before merging (with what is missing), room for old + new or an explicit
in-place replace, a margin proportional to the checkpoint, and a full disk while writing."""

from __future__ import annotations

import errno
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from checkpoint_files import leftovers, snapshot
from patch_sites import fail_pwrite_at, replace_at

import fastsave
from fastsave import DiskSpaceError
from fastsave.io.disk_space import needed_bytes

Usage = namedtuple("Usage", "total used free")
PLENTY = 10**12
_REAL_DISK_USAGE = shutil.disk_usage


def _fake_disk_usage(free_by_path: dict[Path, int]):
    real = _REAL_DISK_USAGE

    def disk_usage(path):
        path = Path(path).resolve()
        for root, free in free_by_path.items():
            if path == root or root in path.parents:
                return Usage(PLENTY, 0, free)
        return real(path)

    return disk_usage


def _no_writer(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the writer started: the check did not come before the merge")

    monkeypatch.setattr("fastsave.pipeline.write.ShardWriter", refuse)


def test_full_disk_is_refused_before_merging(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    out = tmp_path / "a" / "b" / "out"
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({tmp_path.resolve(): 10**6}))
    _no_writer(monkeypatch)
    with pytest.raises(DiskSpaceError, match=r"(?s)not enough disk space.*missing.*Nothing was written"):
        fastsave.save_pretrained_merged(model, out)
    assert list(tmp_path.iterdir()) == []  # not even the parents it would have created
    with torch.no_grad():  # the model is untouched and still runs
        model(torch.tensor([[1, 2, 3]]))


def test_margin_is_proportional_to_the_checkpoint(qlora_model, tmp_path, monkeypatch):
    """A fixed 64 MiB margin refused a 0.2 MB save on a disk with 50 MB free."""
    model = qlora_model()
    assert needed_bytes(230_000, 1) < 3 * 10**6
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({tmp_path.resolve(): 3 * 10**6}))
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_room_for_old_and_new_or_an_explicit_replace_in_place(
    qlora_model, tmp_path, monkeypatch, fastsave_log
):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    data = (out / "model.safetensors").stat().st_size
    # room for the new checkpoint only if the old one were gone
    free = needed_bytes(data, 1) - 100_000
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({tmp_path.resolve(): free}))
    _no_writer(monkeypatch)
    with pytest.raises(
        DiskSpaceError, match=r"(?s)previous checkpoint.*stays until.*missing.*replace_in_place=True"
    ):
        fastsave.save_pretrained_merged(model, out, dtype=torch.float16)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({tmp_path.resolve(): free}))
    with fastsave_log.at_level("WARNING", logger="fastsave"):
        fastsave.save_pretrained_merged(model, out, dtype=torch.float16, replace_in_place=True)
    assert "deleted before writing" in fastsave_log.text
    assert (out / "notes.txt").read_text() == "mine"
    assert next(iter(fastsave.io.verify.verify_checkpoint(out).problems), None) is None
    with pytest.raises(ValueError, match="replace_in_place must be True or False"):
        fastsave.save_pretrained_merged(model, out, replace_in_place="yes")


def test_temporary_location_elsewhere_checks_both_disks(qlora_model, tmp_path, monkeypatch):
    """Staging elsewhere still ends on the target's disk before the switch: both need room."""
    model = qlora_model()
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    full.mkdir()
    roomy.mkdir()
    out = full / "out"
    # two directories of one filesystem, made to look like two disks
    compared = replace_at(monkeypatch, "fastsave.io.staging.same_filesystem", lambda a, b: False)
    monkeypatch.setattr(
        shutil, "disk_usage", _fake_disk_usage({full.resolve(): 10**6, roomy.resolve(): PLENTY})
    )
    with pytest.raises(
        DiskSpaceError, match=rf"(?s)not enough disk space in {re.escape(str(full))}.*copied over"
    ):
        fastsave.save_pretrained_merged(model, out, temporary_location=roomy)
    assert compared and not out.exists() and leftovers(roomy, full) == []
    monkeypatch.setattr(
        shutil, "disk_usage", _fake_disk_usage({full.resolve(): PLENTY, roomy.resolve(): 10**6})
    )
    with pytest.raises(DiskSpaceError, match=rf"(?s)temporary_location {re.escape(str(roomy))}"):
        fastsave.save_pretrained_merged(model, out, temporary_location=roomy)
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({}))
    fastsave.save_pretrained_merged(model, out, temporary_location=roomy)
    assert (out / "model.safetensors").is_file() and leftovers(roomy, full) == []


def test_disk_filling_up_while_writing_names_the_directory_and_bytes_left(qlora_model, tmp_path, monkeypatch):
    from fastsave.io import shards

    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, max_shard_size="50KB")
    before = snapshot(out)
    real, calls = shards.ShardWriter._write_data, []

    def fill_up(self, data, release=None):
        calls.append(len(data))
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, release)

    monkeypatch.setattr(shards.ShardWriter, "_write_data", fill_up)
    with pytest.raises(
        DiskSpaceError,
        match=rf"(?s)disk holding {re.escape(str(tmp_path))} filled up.*MB of tensor data.*still to be written.*previous contents",
    ):
        fastsave.save_pretrained_merged(model, out)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []


def test_disk_filling_up_under_the_io_thread_is_the_same_error(qlora_model, tmp_path, monkeypatch):
    """The bytes reach the disk on the writer's I/O thread (fastsave.io.direct_file): a full disk
    there fails the save the same way, before anything is published."""
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, max_shard_size="50KB")
    before = snapshot(out)
    calls = fail_pwrite_at(monkeypatch, 4, errno.ENOSPC)
    with pytest.raises(DiskSpaceError, match=rf"(?s)disk holding {re.escape(str(tmp_path))} filled up"):
        fastsave.save_pretrained_merged(model, out, max_shard_size="50KB")
    assert len(calls) == 4 and snapshot(out) == before and leftovers(tmp_path, out) == []
