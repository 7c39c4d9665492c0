"""Models without an adapter (a full fine-tune, a plain 4-bit model) are saved, not refused, and a
process with is_main_process=False does nothing at all, before looking at its arguments."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from checkpoint_files import saved_tensors
from transformers import AutoModelForCausalLM

import fastsave
import fastsave.api
from fastsave.errors import PlanError
from fastsave.tiny import load_4bit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_plain_4bit_model_is_saved_dequantized(tiny_base_dir, tmp_path, fastsave_log):
    """merged_16bit of a 4-bit model with no adapter: bitsandbytes' float32 dequantize, rounded once."""
    model = load_4bit(tiny_base_dir)
    expected = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            state32 = copy.copy(weight.quant_state)
            state32.dtype = torch.float32
            dequantized = bnb_functional.dequantize_4bit(weight.data.view(torch.uint8), state32)
            expected[f"{name}.weight"] = dequantized.to(torch.bfloat16)
    assert len(expected) == 14
    out = tmp_path / "out"
    assert fastsave.save_pretrained_merged(model, out) == str(out)
    assert any(
        "no adapter found: saving the model's own weights (dequantized)" in m for m in fastsave_log.messages
    )
    saved = saved_tensors(out)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    base = saved_tensors(tiny_base_dir)
    for name in set(base) - set(expected):
        assert torch.equal(saved[name], base[name]), name
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_full_fine_tune_is_saved_as_it_is(tiny_base_dir, tmp_path, fastsave_log):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # "trained"
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    assert any(
        "no adapter found: saving the model's own weights (as they are)" in m for m in fastsave_log.messages
    )
    saved = saved_tensors(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_lora_save_of_a_model_without_adapter_is_refused(tiny_base_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16)
    with pytest.raises(PlanError, match="has none"):
        fastsave.save_pretrained_merged(model, tmp_path / "out", save_method="lora")
    assert list(tmp_path.iterdir()) == []


def test_not_main_process_returns_none_before_anything(qlora_model, tmp_path, monkeypatch):
    """Every save and push returns None at once on a non-main rank, even with arguments that would be
    refused on the main one, and touches neither the disk nor the network."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a non-main process reached the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    model = fastsave.patch(qlora_model())
    bad = dict(save_method="no such method", max_shard_size="lots", is_main_process=False)
    assert fastsave.save_pretrained_merged(model, tmp_path / "a", **bad) is None
    assert model.save_pretrained_merged(tmp_path / "b", None, **bad) is None
    assert model.push_to_hub_merged("not a valid repo id!", None, **bad) is None
    assert fastsave.api.push_to_hub_merged(model, "", **bad) is None
    assert model.save_pretrained_gguf(tmp_path / "c", None, "no such type", is_main_process=False) is None
    assert model.push_to_hub_gguf("", None, "no such type", is_main_process=False) is None
    assert list(tmp_path.iterdir()) == []
    fastsave.unpatch(model)


def test_a_model_with_an_adapter_says_nothing_of_it(qlora_model, tmp_path, fastsave_log):
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out")
    assert not any("no adapter found" in m for m in fastsave_log.messages)
