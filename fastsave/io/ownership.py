"""Which files a checkpoint of each kind consists of: what a save may replace, and nothing else.

A save owns only the files of a checkpoint of its own kind. Every other file in ``save_directory``
(the user's notes, ``model-best.safetensors``, a Trainer's ``checkpoint-500/``, ...) is kept, byte
for byte, through the switch:

- merged (``merged_16bit``, ``merged_4bit_forced``): ``model.safetensors``,
  ``model-NNNNN-of-NNNNN.safetensors``, their ``pytorch_model*.bin`` twins, both index files and
  every weight file an index names, ``config.json``, ``generation_config.json``;
- adapter (``lora``): ``adapter_config.json``, ``adapter_model.safetensors`` / ``.bin``, and the
  sub-folders of non-default adapters that the new save writes;
- GGUF export: the ``.gguf`` files it writes;
- all: the tokenizer files the new save writes (and, when the previous checkpoint was written by
  fastsave, its stale tokenizer files), and a ``README.md`` only when it carries
  :data:`MODEL_CARD_MARKER` (a card fastsave wrote; fastsave.io.model_card puts it there). A
  user's own README.md is never replaced: a card the new save would write is then left out.

A merged checkpoint is never written into a directory holding an adapter, nor an adapter into one
holding merged weights (:func:`check_kinds_do_not_mix`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastsave.errors import MixedKindsError
from fastsave.io.format import FASTSAVE_METADATA_KEY, read_safetensors_header
from fastsave.io.model_card import MODEL_CARD_MARKER, README_NAME, is_fastsave_card  # noqa: F401 - the rule's marker
from fastsave.io.names import ANY_VARIANT, is_index_name, is_weight_file_name

ADAPTER = "adapter"
MERGED = "merged"
GGUF = "gguf"

MODEL_CARD_NAME = README_NAME
# The card writer puts MODEL_CARD_MARKER into every README.md it writes (after any YAML front
# matter, which the hub needs on the first line); only a README.md carrying it belongs to a save.

MERGED_FILES = ("config.json", "generation_config.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def kind_of(save_method: str) -> str:
    """ADAPTER for ``save_method="lora"``, MERGED for the merged methods."""
    return ADAPTER if save_method == "lora" else MERGED


def _read_index(path: Path) -> dict | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return index if isinstance(index, dict) else None


def _plain_name(value: object) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


def files_named_by_index(directory: Path, index_name: str) -> list[str]:
    """The weight files an index's weight_map names that exist in ``directory`` (plain names only)."""
    index = _read_index(directory / index_name)
    weight_map = index.get("weight_map") if index else None
    if not isinstance(weight_map, dict):
        return []
    names = {v for v in weight_map.values() if _plain_name(v)}
    return sorted(n for n in names if (directory / n).is_file())


def merged_weight_files(directory: Path, variant: object = ANY_VARIANT) -> list[str]:
    """Weight files and indexes of a merged (transformers) checkpoint in ``directory``: of one
    ``variant`` (None: the plain names), or of any by default."""
    if not directory.is_dir():
        return []
    names = os.listdir(directory)
    found = {n for n in names if is_weight_file_name(n, variant)}
    for index_name in (n for n in names if is_index_name(n, variant)):
        found.add(index_name)
        found.update(files_named_by_index(directory, index_name))
    return sorted(n for n in found if (directory / n).is_file())


def adapter_files(directory: Path) -> list[str]:
    """The top-level files of a peft adapter in ``directory``."""
    if not directory.is_dir():
        return []
    return [n for n in ADAPTER_FILES if (directory / n).is_file()]


def written_by_fastsave(directory: Path, variant: str | None = None) -> bool:
    """Whether the merged checkpoint (of ``variant``) in ``directory`` carries fastsave's metadata key."""

    for name in merged_weight_files(directory, variant):
        if is_index_name(name):
            index = _read_index(directory / name)
            if (
                index
                and isinstance(index.get("metadata"), dict)
                and FASTSAVE_METADATA_KEY in index["metadata"]
            ):
                return True
        elif name.endswith(".safetensors"):
            try:
                header = read_safetensors_header(directory / name)
            except (OSError, ValueError):
                continue
            if FASTSAVE_METADATA_KEY in (header.get("__metadata__") or {}):
                return True
    return False


def check_kinds_do_not_mix(directory: Path, kind: str) -> None:
    """Refuse a save whose kind differs from the checkpoint already in ``directory``.

    Raises:
        MixedKindsError: naming the files found and suggesting another directory.
    """
    if kind == GGUF:
        return  # GGUF files may sit beside either (Unsloth's layout puts them beside the merged model)
    if kind == MERGED:
        found = adapter_files(directory)
        what, ours = "a LoRA adapter", "a merged model"
    else:
        found = merged_weight_files(directory)
        what, ours = "a merged model's weights", "a LoRA adapter"
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise MixedKindsError(
        f"{str(directory)!r} holds {what} ({shown}); saving {ours} there would leave a directory that "
        f"loads as neither. Nothing was written. Save into another directory, for example "
        f"{str(directory.with_name(directory.name + ('-merged' if kind == MERGED else '-lora')))!r}."
    )


@dataclass
class Replacement:
    """How a new checkpoint's top-level entries meet what is already in the directory."""

    remove: list[str] = field(default_factory=list)  # the previous checkpoint's entries: they go
    keep_user: list[str] = field(default_factory=list)  # new entries left out: the user's file wins
    conflicts: list[str] = field(default_factory=list)  # new entries that would overwrite user data


def previous_checkpoint(
    directory: Path, kind: str, new_names: set[str] = frozenset(), variant: str | None = None
) -> list[str]:
    """Top-level names of the checkpoint of ``kind`` already in ``directory`` (replaced or removed).

    ``new_names`` (the new save's top-level entries) decide two things: whether the save writes a
    tokenizer (then a previous fastsave save's stale tokenizer files go too), and which adapter
    sub-folders an adapter save replaces. A merged save of one ``variant`` replaces the weights of
    that variant only (transformers keeps a repository's fp16 and plain variants side by side).
    """
    if not directory.is_dir():
        return []
    existing = set(os.listdir(directory))
    owned: set[str] = set()
    if kind == MERGED:
        owned.update(merged_weight_files(directory, variant))
        owned.update(n for n in MERGED_FILES if n in existing)
        if new_names & set(TOKENIZER_FILES) and written_by_fastsave(directory, variant):
            owned.update(n for n in TOKENIZER_FILES if n in existing)  # stale files of our previous save
    elif kind == ADAPTER:
        owned.update(adapter_files(directory))
        owned.update(n for n in new_names & existing if _is_adapter_folder(directory / n))
    if MODEL_CARD_NAME in existing and is_fastsave_card(directory / MODEL_CARD_NAME):
        owned.add(MODEL_CARD_NAME)
    return sorted(owned)


def _is_adapter_folder(path: Path) -> bool:
    """A sub-folder holding nothing but a non-default adapter as peft saves it (or nothing at all)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = set(os.listdir(path))
    return not names or (ADAPTER_CONFIG in names and names <= {*ADAPTER_FILES, MODEL_CARD_NAME})


def plan_replacement(directory: Path, kind: str, staging: Path, variant: str | None = None) -> Replacement:
    """What switching the checkpoint staged in ``staging`` into ``directory`` replaces and keeps.

    A new file replaces a same-named file (tokenizer files the save writes now are its own), except
    a README.md without :data:`MODEL_CARD_MARKER`, which stays the user's. A new sub-folder may only
    replace an adapter sub-folder; over anything else it is a conflict.
    """
    new_names = set(os.listdir(staging))
    replacement = Replacement(remove=previous_checkpoint(directory, kind, new_names, variant))
    if not directory.is_dir():
        return replacement
    for name in sorted(new_names - set(replacement.remove)):
        existing = directory / name
        if not os.path.lexists(existing):
            continue
        if name == MODEL_CARD_NAME:
            replacement.keep_user.append(name)
        elif (staging / name).is_dir() or (existing.is_dir() and not existing.is_symlink()):
            replacement.conflicts.append(name)
        else:
            replacement.remove.append(name)
    replacement.remove.sort()
    return replacement
