"""What the tests read back from a directory a save wrote: its tensors, a snapshot, leftovers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in ``directory``, by name."""
    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = handle.get_tensor(key)
    return tensors


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory``: kind, bytes digest or link target, inode."""
    entries = {}
    for path in sorted(Path(directory).rglob("*")):
        rel = str(path.relative_to(directory))
        info = os.lstat(path)
        if path.is_symlink():
            entries[rel] = ("link", os.readlink(path), info.st_ino)
        elif path.is_dir():
            entries[rel] = ("dir",)
        else:
            entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_ino)
    return entries


def leftovers(*places: Path) -> list[str]:
    """What fastsave staged or locked (``.fastsave*`` entries) anywhere under ``places``."""
    return sorted(
        str(p.relative_to(place))
        for place in map(Path, places)
        if place.is_dir()
        for p in place.rglob(".fastsave*")
    )
