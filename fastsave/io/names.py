"""The file names of a transformers checkpoint: weight files, shards, indexes, and their variants.

transformers names them ``model.safetensors`` (one shard), ``model-00001-of-00003.safetensors``
(several) and ``model.safetensors.index.json``, ``pytorch_model*.bin`` alike; with ``variant=``
(``modeling_utils._add_variant``) the variant comes before the extension:
``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
``model.safetensors.index.fp16.json``. The writer names its shards with these rules, and
ownership, verification and the on-disk reader recognise files with the same ones.
"""

from __future__ import annotations

import re

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
INDEX_NAMES = (WEIGHTS_INDEX_NAME, BIN_WEIGHTS_INDEX_NAME)

_WEIGHT_FILE = re.compile(
    r"(?:model|pytorch_model)(?:\.(?P<variant>[^./]+?))?(?:-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)"
)
_INDEX_FILE = re.compile(r"(?:model\.safetensors|pytorch_model\.bin)\.index(?:\.(?P<variant>[^./]+))?\.json")
ANY_VARIANT = object()


def _with_variant(filename: str, variant: str | None) -> str:
    """``filename`` as transformers names it for ``variant`` (unchanged for None)."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def shard_names(count: int, safe_serialization: bool = True, variant: str | None = None) -> list[str]:
    """The names of a checkpoint's ``count`` weight files, in order."""
    single = WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME
    stem, ext = single.rsplit(".", 1)
    prefix = f"{stem}.{variant}" if variant is not None else stem
    if count == 1:
        return [f"{prefix}.{ext}"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]


def index_name(safe_serialization: bool = True, variant: str | None = None) -> str:
    """The name of the index of a checkpoint of several weight files."""
    return _with_variant(WEIGHTS_INDEX_NAME if safe_serialization else BIN_WEIGHTS_INDEX_NAME, variant)


def is_weight_file_name(name: str, variant: object = ANY_VARIANT) -> bool:
    """``model.safetensors``, ``model-00001-of-00003.safetensors``, ``pytorch_model.bin``, ... (of
    ``variant``: None for the plain names, a string for transformers' ``variant=``; any by default).

    A ``pytorch_model.bin`` beside safetensors is the same checkpoint's twin. ``model-best.safetensors``
    or ``model_backup.safetensors`` is not a weight file of a checkpoint.
    """
    match = _WEIGHT_FILE.fullmatch(name)
    if match is None or (match["ext"] == "bin") != name.startswith("pytorch_model"):
        return False
    return variant is ANY_VARIANT or match["variant"] == variant


def is_index_name(name: str, variant: object = ANY_VARIANT) -> bool:
    """``model.safetensors.index.json`` (``.index.<variant>.json``) and the .bin index."""
    match = _INDEX_FILE.fullmatch(name)
    return match is not None and (variant is ANY_VARIANT or match["variant"] == variant)


def variant_of(name: str) -> str | None:
    """The transformers variant in a weight file or index name (None: the plain names)."""
    match = _WEIGHT_FILE.fullmatch(name) or _INDEX_FILE.fullmatch(name)
    return match["variant"] if match else None
