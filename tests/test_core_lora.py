"""save_method="lora" writes the adapter exactly as peft does, plus the tokenizer."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import fastsave


def test_lora_equals_peft(qlora_model, tiny_tokenizer, tmp_path):
    model = qlora_model()
    model.save_pretrained(tmp_path / "peft")
    fastsave.save_pretrained_merged(model, tmp_path / "ours", tiny_tokenizer, save_method="lora")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 28
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "peft" / "adapter_config.json").read_text()
    )
    assert (tmp_path / "ours" / "tokenizer.json").exists()
    assert not list((tmp_path / "ours").glob("model*.safetensors"))


def test_lora_second_adapter_in_subfolder(qlora_model, tmp_path):
    from peft import LoraConfig

    model = qlora_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    fastsave.save_pretrained_merged(model, tmp_path / "out", save_method="lora")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").exists()
    fastsave.save_pretrained_merged(model, tmp_path / "only", save_method="lora", adapter_names=["other"])
    assert (tmp_path / "only" / "other" / "adapter_config.json").exists()
    assert not (tmp_path / "only" / "adapter_model.safetensors").exists()
