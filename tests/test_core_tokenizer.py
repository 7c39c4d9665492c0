"""Tokenizer files: every one is kept, tokenizer.model too (GGUF converters look for it)."""

from __future__ import annotations

import filecmp

import pytest

import fastsave

pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")


def test_tokenizer_model_is_kept_when_the_base_has_one(qlora_model, tmp_path):
    from transformers import AutoTokenizer

    from fastsave.tiny import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path / "tok")
    plain = tmp_path / "plain"
    tokenizer.save_pretrained(plain)
    # The reason for the copy: transformers 5 re-saves this tokenizer without tokenizer.model.
    saved_by_transformers = {p.name for p in plain.iterdir()}

    for method in ("merged_16bit", "lora"):
        out = tmp_path / method
        fastsave.save_pretrained_merged(qlora_model(), out, tokenizer, save_method=method)
        assert (out / "tokenizer.model").exists(), method
        assert filecmp.cmp(out / "tokenizer.model", tmp_path / "tok" / "tokenizer.model", shallow=False)
        assert saved_by_transformers <= {p.name for p in out.iterdir()}
        reloaded = AutoTokenizer.from_pretrained(out)
        text = "the quick brown fox"
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
