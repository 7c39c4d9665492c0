"""A save that cannot fit on disk is refused before anything is written, with what to do."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import fastsave
from fastsave import DiskSpaceError

Usage = namedtuple("Usage", "total used free")
PLENTY = 10**12


def _fake_disk_usage(free_by_path: dict[Path, int]):
    real = shutil.disk_usage

    def disk_usage(path):
        path = Path(path).resolve()
        for root, free in free_by_path.items():
            if path == root or root in path.parents:
                return Usage(PLENTY, 0, free)
        return real(path)

    return disk_usage


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".fastsave-staging")]


def test_full_staging_disk_is_refused_before_writing(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    out = tmp_path / "out"
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage({tmp_path.resolve(): 10**6}))
    with pytest.raises(
        DiskSpaceError, match=r"(?s)not enough disk space.*temporary_location.*Nothing was written"
    ):
        fastsave.save_pretrained_merged(model, out)
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    with torch.no_grad():  # the model is untouched and still runs
        model(torch.tensor([[1, 2, 3]]))


def test_temporary_location_with_room_is_the_way_out(qlora_model, tmp_path, monkeypatch):
    """Staging elsewhere only helps when the destination can take the copy: both are checked."""
    model = qlora_model()
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    full.mkdir()
    roomy.mkdir()
    out = full / "out"
    # two directories of one filesystem, made to look like two disks
    monkeypatch.setattr("fastsave.disk_space.same_filesystem", lambda a, b: False)
    monkeypatch.setattr(
        shutil, "disk_usage", _fake_disk_usage({full.resolve(): 10**6, roomy.resolve(): PLENTY})
    )
    with pytest.raises(DiskSpaceError, match=rf"(?s)needs about .* in {re.escape(str(full))}.*copied over"):
        fastsave.save_pretrained_merged(model, out, temporary_location=roomy)
    assert not out.exists() and _leftovers(roomy) == []

    monkeypatch.setattr(
        shutil, "disk_usage", _fake_disk_usage({full.resolve(): PLENTY, roomy.resolve(): PLENTY})
    )
    fastsave.save_pretrained_merged(model, out, temporary_location=roomy)
    assert (out / "model.safetensors").is_file() and _leftovers(roomy) == []


def test_space_freed_by_replacing_an_old_checkpoint_counts_across_disks(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    disk, staging = tmp_path / "disk", tmp_path / "staging"
    staging.mkdir()
    out = disk / "out"
    fastsave.save_pretrained_merged(model, out)
    old_weights = (out / "model.safetensors").stat().st_size
    monkeypatch.setattr("fastsave.disk_space.same_filesystem", lambda a, b: False)
    # the destination has only the margin free besides the old weights that the new ones replace
    margin = 64 * 2**20 + old_weights // 50
    monkeypatch.setattr(
        shutil, "disk_usage", _fake_disk_usage({disk.resolve(): margin, staging.resolve(): PLENTY})
    )
    fastsave.save_pretrained_merged(model, out, temporary_location=staging)
    assert (out / "model.safetensors").stat().st_size == old_weights
    (out / "model.safetensors").unlink()  # nothing left to replace: the same free space is too little
    with pytest.raises(DiskSpaceError):
        fastsave.save_pretrained_merged(model, out, temporary_location=staging)
