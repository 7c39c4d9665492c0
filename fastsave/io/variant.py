"""``variant=``: weight files named as transformers names them for a variant.

transformers (``modeling_utils._add_variant``) puts the variant before the extension:
``model.fp16.safetensors``, shards ``model.fp16-00001-of-00002.safetensors`` and the index
``model.safetensors.index.fp16.json`` (``.bin`` alike), and loads them with
``from_pretrained(path, variant="fp16")``. The shards are written under the plain names first and
renamed in the staging directory, with the index rewritten to match, before anything is published.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastsave.io.checksums import SHA256_KEY

_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def variant_name(filename: str, variant: str) -> str:
    """The name transformers gives ``filename`` (a weight file or an index) for ``variant``."""
    if filename in _INDEX_FILES:
        stem, ext = filename.rsplit(".", 1)
        return f"{stem}.{variant}.{ext}"
    match = _WEIGHT_FILE.match(filename)
    if match is None:
        raise ValueError(f"{filename!r} is not a weight file name")
    prefix, shard, ext = match.groups()
    return f"{prefix}.{variant}{shard or ''}.{ext}"


def apply_variant(directory: Path, variant: str | None) -> list[str]:
    """Rename the weight files and index in ``directory`` for ``variant``; return the new weight names."""
    if variant is None:
        return []
    renamed: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if _WEIGHT_FILE.match(path.name):
            renamed[path.name] = variant_name(path.name, variant)
            path.rename(directory / renamed[path.name])
    for index_name in _INDEX_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            index["weight_map"] = {k: renamed.get(v, v) for k, v in index["weight_map"].items()}
            digests = index.get("metadata", {}).get(SHA256_KEY)  # fastsave.io.checksums, by file name
            if isinstance(digests, dict):
                index["metadata"][SHA256_KEY] = {renamed.get(k, k): v for k, v in sorted(digests.items())}
            (directory / variant_name(index_name, variant)).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
            index_path.unlink()
    return sorted(renamed.values())
