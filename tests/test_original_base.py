"""base_weights="original": the adapter merged into the 16-bit checkpoint on disk, not the NF4 weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fastsave
from fastsave.inputs.live_model import LiveModelInput
from fastsave.options import parse_options
from fastsave.tiny import (
    attach_lora,
    build_tiny_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
    train_steps,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = save_random_model(tiny_llama_config(), tmp_path_factory.mktemp("orig") / "base", seed=3)
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def _peft_reference(base, adapter_dir) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload on the float32 base: the independent oracle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().state_dict()


def _trained(base, tokenizer, steps=2, **lora_kwargs):
    model = attach_lora(load_4bit(base), **lora_kwargs)
    train_steps(model, tokenizer, steps=steps)
    return model


@pytest.mark.parametrize("lora", [{}, {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}])
def test_equals_peft_merge_on_the_16bit_base(base, tokenizer, tmp_path, lora, fastsave_log):
    model = _trained(base, tokenizer, **lora)
    model.save_pretrained(str(tmp_path / "adapter"))
    fastsave.save_pretrained_merged(model, tmp_path / "out", tokenizer, base_weights="original")
    assert "base_weights='original'" in fastsave_log.text and str(base) in fastsave_log.text
    assert "original 16-bit base checkpoint" in fastsave_log.text

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = _peft_reference(base, tmp_path / "adapter")
    for name, tensor in saved.items():
        # W_original(float32) + delta, rounded once: bit for bit what peft gives on a float32 base
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    # untargeted linears are the 16-bit originals, not their NF4 round trip
    disk = load_file(str(base / "model.safetensors"))
    if lora:
        assert torch.equal(
            saved["model.layers.0.mlp.up_proj.weight"], disk["model.layers.0.mlp.up_proj.weight"]
        )


def test_row_blocks_merged_on_the_16bit_base_are_written_from_their_memory(
    base, tokenizer, tmp_path, monkeypatch
):
    """The torch row merge (here on the original 16-bit base, the compiled one-pass merge turned
    off) allocates its rounded blocks where the writer takes them without a copy
    (fastsave.io.placement; the smallest length written so lowered to 4 KiB for the tiny model):
    every write is one O_DIRECT takes, bytes went out from the blocks' memory, and every tensor is
    still bit for bit peft's merge on the float32 base."""
    from patch_sites import aligned_direct_writes

    from fastsave.io import direct_file
    from fastsave.merge import row_blocks
    from fastsave.sources import nf4_native

    monkeypatch.setattr(nf4_native, "available", lambda: False)
    fused: list[str] = []
    real_fused = row_blocks.stream_fused_rows
    monkeypatch.setattr(
        row_blocks,
        "stream_fused_rows",
        lambda plan, dtype: fused.append(plan.name) or real_fused(plan, dtype),
    )

    model = _trained(base, tokenizer)
    model.save_pretrained(str(tmp_path / "adapter"))
    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", direct_file.ALIGN)
    _, in_place = aligned_direct_writes(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out", tokenizer, base_weights="original")
    assert in_place and in_place[0] > 0 and not fused
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = _peft_reference(base, tmp_path / "adapter")
    for name, tensor in saved.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_dora_against_peft(base, tokenizer, tmp_path):
    model = _trained(base, tokenizer, use_dora=True, target_modules=["q_proj", "down_proj"])
    model.save_pretrained(str(tmp_path / "adapter"))
    fastsave.save_pretrained_merged(model, tmp_path / "out", base_weights="original")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = _peft_reference(base, tmp_path / "adapter")
    for name, tensor in saved.items():
        # DoRA too: magnitude / ||W + delta|| * (W + delta) in float32, in peft's order: bit for bit
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_plan_has_the_same_names_shapes_and_dtypes(base, tokenizer):
    model = _trained(base, tokenizer, steps=0, modules_to_save=["lm_head"])
    normal = LiveModelInput(model).merged_plan(parse_options("unused"))
    original = LiveModelInput(model).merged_plan(parse_options("unused", base_weights="original"))
    assert [(t.name, t.shape, t.dtype, t.lora_module) for t in normal.items] == [
        (t.name, t.shape, t.dtype, t.lora_module) for t in original.items
    ]
    swapped = {t.name for t in original.items if t.source_kind.startswith("16-bit checkpoint")}
    assert len(swapped) == 14 and "lm_head.weight" not in swapped and "model.norm.weight" not in swapped


def test_explicit_path_and_hf_cache(base, tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = _trained(base, tokenizer, steps=0)
    model.get_base_model().config._name_or_path = "tiny-org/not-here"
    fastsave.save_pretrained_merged(
        model, tmp_path / "explicit", base_weights="original", original_base_path=str(base)
    )
    # in the local cache only: found without any network access
    cache = tmp_path / "hub"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / "models--tiny-org--not-here"
    shutil.copytree(base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fastsave.save_pretrained_merged(model, tmp_path / "cached", base_weights="original")
    assert (tmp_path / "explicit" / "model.safetensors").read_bytes() == (
        tmp_path / "cached" / "model.safetensors"
    ).read_bytes()


def test_not_found_is_an_error_before_writing(base, tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = _trained(base, tokenizer, steps=0)
    model.get_base_model().config._name_or_path = "tiny-org/never-downloaded"
    with pytest.raises(ValueError, match="original_base_path") as error:
        fastsave.save_pretrained_merged(model, tmp_path / "out", base_weights="original")
    assert "never downloads" in str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".fastsave-staging*"))


def test_quantized_or_mismatched_checkpoint_is_refused(base, tokenizer, tmp_path):
    model = _trained(base, tokenizer, steps=0)
    quantized = tmp_path / "bnb"
    model.get_base_model().save_pretrained(str(quantized))  # a 4-bit checkpoint
    with pytest.raises(ValueError, match="not the 16-bit base"):
        fastsave.save_pretrained_merged(
            model, tmp_path / "out", base_weights="original", original_base_path=str(quantized)
        )
    other = save_random_model(tiny_llama_config(hidden_size=32), tmp_path / "other")
    with pytest.raises(ValueError, match="does not match this model"):
        fastsave.save_pretrained_merged(
            model, tmp_path / "out", base_weights="original", original_base_path=str(other)
        )
    assert not (tmp_path / "out").exists()


def test_config_is_a_plain_16bit_one(base, tokenizer, tmp_path):
    model = _trained(base, tokenizer, steps=0)
    model(torch.tensor([[1, 5, 9]]))  # runs once: bitsandbytes may repack the 4-bit weights on the CPU
    fastsave.save_pretrained_merged(model, tmp_path / "out", tokenizer, base_weights="original")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
