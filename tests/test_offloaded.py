"""Models with accelerate-offloaded weights (meta tensors whose values live in an offload map)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastsave
from fastsave.errors import PlanError
from fastsave.tiny import attach_lora, save_random_model, tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 40, 7]])
# layer 1 and lm_head on "disk" (accelerate's offload folder), the rest offloaded to the CPU map
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_random_model(tiny_llama_config(), tmp_path_factory.mktemp("offload") / "base", seed=3)


def test_offloaded_weights_are_read_from_accelerate_and_merged_exactly(base, tmp_path):
    from accelerate import dispatch_model
    from peft import PeftModel

    model = attach_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), r=8)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        before = model(IDS).logits
    dispatch_model(model.base_model.model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert (
        layer.base_layer.weight.device.type == "meta" and layer.lora_A["default"].weight.device.type == "meta"
    )

    fastsave.save_pretrained_merged(model, tmp_path / "out")

    # oracle: peft's own merge on a float32 copy of the same base and adapter, rounded once
    f32 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(f32, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(reference)
    for name, tensor in saved.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    # still offloaded (read one tensor at a time, never loaded into the model) and computing the same
    assert layer.base_layer.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_meta_weight_without_values_is_refused_before_writing(base, tmp_path):
    model = attach_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), r=8)
    norm = model.base_model.model.model.norm
    norm.weight = torch.nn.Parameter(torch.empty_like(norm.weight, device="meta"))
    with pytest.raises(
        PlanError, match=r"(?s)model\.norm\.weight.*meta device.*fastsave merge.*Nothing was written"
    ):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
