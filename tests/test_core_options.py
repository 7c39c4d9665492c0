"""Every invalid argument is rejected before anything is written."""

from __future__ import annotations

import pytest
import torch

import fastsave
from fastsave.options import parse_shard_size


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"save_method": "merged_4bit"}, ValueError, "merged_4bit_forced"),
        ({"save_method": "gguf"}, ValueError, "unknown"),
        ({"maximum_memory_usage": 0}, ValueError, "0 < x <= 0.95"),
        ({"maximum_memory_usage": 0.99}, ValueError, "0 < x <= 0.95"),
        ({"maximum_memory_usage": "half"}, ValueError, "fraction"),
        ({"max_shard_size": "5 gigs"}, ValueError, "not a size"),
        ({"max_shard_size": -1}, ValueError, "positive"),
        ({"dtype": torch.int8}, ValueError, "float16"),
        ({"base_weights": "fp32"}, ValueError, "dequantized"),
        ({"save_methd": "lora"}, TypeError, "save_methd"),
        ({"adapter_names": []}, ValueError, "adapter_names"),
    ],
)
def test_bad_options_raise_before_writing(qlora_model, tmp_path, kwargs, error, words):
    model = qlora_model()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastsave.save_pretrained_merged(model, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_save_directory_that_is_a_file(qlora_model, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file"):
        fastsave.save_pretrained_merged(qlora_model(), target)
    assert target.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_unknown_adapter_name_refused(qlora_model, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", adapter_names=["nope"])
    assert list(tmp_path.iterdir()) == []


def test_not_main_process_writes_nothing(qlora_model, tmp_path):
    path = fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", is_main_process=False)
    assert path is None  # as Unsloth's methods return
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("100KB", 100_000),
        (1234, 1234),
        ("1.5GB", 1_500_000_000),
    ],
)
def test_shard_sizes_parse_like_transformers(value, expected):
    assert parse_shard_size(value) == expected
