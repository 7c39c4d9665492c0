"""Check a GGUF file against the checkpoint it was converted from, with the ``gguf`` package.

The gguf package is llama.cpp's own reader (gguf-py, shipped in every llama.cpp checkout next to
the converter; ``pip install gguf`` works too). Checked: the file reads; every checkpoint tensor
that gguf's own name map knows is in the file, with its shape; no tensor is in the file that the
checkpoint does not account for (when the map knows every checkpoint tensor); the vocabulary has as
many tokens as the embedding has rows and the config says; the block count is the config's.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from safetensors import safe_open

from fastsave.errors import GGUFVerificationError
from fastsave.export.llama_cpp import LlamaCpp

# Tensors the converter makes without a checkpoint tensor of their own.
_GENERATED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass
class CheckpointFacts:
    """What a GGUF is checked against, read from the 16-bit checkpoint before it is removed."""

    tensor_shapes: dict[str, tuple[int, ...]]
    vocab_size: int | None
    num_layers: int | None


@dataclass
class GGUFCheck:
    """A verified GGUF file."""

    path: Path  # the first part of a split model
    size_bytes: int  # of every part
    file_type: str
    architecture: str
    tensor_count: int
    vocab_size: int
    shapes_checked: int
    notes: list[str] = field(default_factory=list)


def read_checkpoint_facts(directory: Path) -> CheckpointFacts:
    """Tensor names and shapes (from the safetensors headers), vocab size and layer count of a checkpoint."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    config = json.loads((directory / "config.json").read_text())
    text = config.get("text_config") or config
    return CheckpointFacts(shapes, text.get("vocab_size"), text.get("num_hidden_layers"))


def facts_from_plan(plan: Any, staged: Path) -> CheckpointFacts:
    """The same facts as :func:`read_checkpoint_facts`, from the plan's names and shapes (the GGUF fed
    straight from the merge has no checkpoint to read) and the staged config.json."""
    shapes = {item.name: tuple(int(d) for d in item.shape) for item in plan.items}
    config = json.loads((staged / "config.json").read_text())
    text = config.get("text_config") or config
    return CheckpointFacts(shapes, text.get("vocab_size"), text.get("num_hidden_layers"))


def load_gguf(tools: LlamaCpp | None = None) -> ModuleType:
    """The gguf package: the one installed, else the checkout's gguf-py (the converter's own version).

    Raises:
        ImportError: neither is there.
    """
    try:
        return importlib.import_module("gguf")
    except ImportError:
        if tools is None or tools.gguf_py is None:
            raise
    sys.path.insert(0, str(tools.gguf_py))
    return importlib.import_module("gguf")


def _field(reader, key: str):
    found = reader.fields.get(key)
    return found.contents() if found is not None else None


def _file_type(reader, gguf: ModuleType, in_file: dict) -> str:
    """The file's type as llama.cpp names it (general.file_type: Q8_0, Q4_K_M, BF16, ...)."""
    value = _field(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError, AttributeError):
        kinds = sorted({kind for shape, kind in in_file.values() if len(shape) > 1})
        return "/".join(kinds) or "?"


def verify_gguf(path: Path | list[Path], facts: CheckpointFacts, gguf: ModuleType) -> GGUFCheck:
    """Check ``path`` against ``facts`` (see the module docstring); a list: the parts of one model
    split in llama.cpp's layout (the metadata in the first, the tensors across all).

    Raises:
        GGUFVerificationError: a missing, extra or misshapen tensor, or a vocabulary or block count
            that does not match the checkpoint.
    """
    parts = path if isinstance(path, list) else [path]
    path = parts[0]
    readers = [gguf.GGUFReader(str(part)) for part in parts]
    reader = readers[0]
    architecture = _field(reader, "general.architecture")
    in_file = {
        t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
        for part_reader in readers
        for t in part_reader.tensors
    }
    if len(parts) > 1 and _field(reader, "split.count") != len(parts):
        raise GGUFVerificationError(
            f"{path.name}: split.count is {_field(reader, 'split.count')}, {len(parts)} parts"
        )
    problems: list[str] = []
    notes: list[str] = []

    arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)
    if arch is None:
        raise GGUFVerificationError(f"{path.name}: unknown architecture {architecture!r} in the GGUF")
    name_map = gguf.get_tensor_name_map(arch, facts.num_layers or 0)
    sources: dict[str, list[str]] = {}
    unmapped = []
    for name in facts.tensor_shapes:
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unmapped.append(name)
        else:
            sources.setdefault(mapped, []).append(name)
    checked = 0
    for mapped, names in sources.items():
        if mapped not in in_file:
            problems.append(f"{mapped} (from {names[0]}) is missing")
        elif len(names) == 1 and in_file[mapped][0] != facts.tensor_shapes[names[0]]:
            problems.append(
                f"{mapped} has shape {in_file[mapped][0]}, {names[0]} has {facts.tensor_shapes[names[0]]}"
            )
        elif len(names) == 1:
            checked += 1
    extra = set(in_file) - set(sources) - set(_GENERATED)
    if not any(n.startswith("lm_head") for n in facts.tensor_shapes):
        extra.discard("output.weight")  # tied embeddings: some converters write the head anyway
    if unmapped:
        notes.append(f"{len(unmapped)} checkpoint tensor(s) unknown to gguf's name map (e.g. {unmapped[0]})")
    elif extra:
        problems.append(f"tensors the checkpoint does not account for: {', '.join(sorted(extra)[:5])}")

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    embedding = in_file.get("token_embd.weight")
    vocab = len(tokens)
    if embedding is not None and embedding[0][0] != vocab:
        problems.append(f"the vocabulary holds {vocab} tokens, token_embd.weight has {embedding[0][0]} rows")
    if facts.vocab_size is not None and vocab != facts.vocab_size:
        problems.append(f"the vocabulary holds {vocab} tokens, the config says vocab_size={facts.vocab_size}")
    blocks = _field(reader, f"{architecture}.block_count")
    if facts.num_layers is not None and blocks is not None and blocks != facts.num_layers:
        problems.append(f"block_count is {blocks}, the config has {facts.num_layers} layers")
    if problems:
        raise GGUFVerificationError(f"{path.name} does not match its checkpoint: " + "; ".join(problems))
    file_type = _file_type(reader, gguf, in_file)
    return GGUFCheck(
        path=path,
        size_bytes=sum(part.stat().st_size for part in parts),
        file_type=file_type,
        architecture=architecture,
        tensor_count=len(in_file),
        vocab_size=vocab,
        shapes_checked=checked,
        notes=notes,
    )
