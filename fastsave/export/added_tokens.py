"""Added tokens written where llama.cpp's converter looks for them, in the export's own staging.

For a sentencepiece vocabulary the converter takes the tokens beyond ``tokenizer.model`` from
``added_tokens.json`` and their kind (control or user-defined) from ``added_tokens_decoder`` in
``tokenizer_config.json``. transformers 5 writes neither (the added tokens live in
``tokenizer.json``), so a chat token added before fine-tuning became ``[PAD<id>]``, an unused
token, in the GGUF: llama.cpp would neither parse a chat template's markers as that token nor
stop on it. Both files are written here from the tokenizer itself, into the temporary checkpoint
the converter reads (never into the user's output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stage_added_tokens(directory: Path, tokenizer: Any) -> int:
    """Write the tokenizer's added tokens for the converter into ``directory`` (a staging checkpoint).

    Returns how many tokens lie beyond the base vocabulary (0 when the tokenizer has none to add).
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if not decoder:
        return 0
    base_size = int(getattr(tokenizer, "vocab_size", 0) or 0)
    beyond = {token.content: int(index) for index, token in decoder.items() if int(index) >= base_size}
    added_file = directory / "added_tokens.json"
    if beyond and not added_file.exists():
        added_file.write_text(json.dumps(beyond, ensure_ascii=False, indent=2))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(int(index)): {
                "content": token.content,
                "special": bool(token.special),
                "lstrip": bool(token.lstrip),
                "rstrip": bool(token.rstrip),
                "normalized": bool(token.normalized),
                "single_word": bool(token.single_word),
            }
            for index, token in sorted(decoder.items())
        }
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return len(beyond)
