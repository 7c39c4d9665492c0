"""save_method="merged_4bit_forced": merged in 16-bit, re-quantized with the model's own settings."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file

import fastsave
from fastsave.formats.requantize_4bit import quantized_layout
from fastsave.sources import quantized_weight_source
from fastsave.sources.bnb_4bit import settings_of
from fastsave.sources.settings_4bit import Quant4bitSettings
from fastsave.tiny import (
    attach_lora,
    build_tiny_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
    train_steps,
)

INPUT = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = save_random_model(tiny_llama_config(), tmp_path_factory.mktemp("forced") / "base", seed=4)
    build_tiny_tokenizer(directory)
    return directory


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits.float()


@pytest.mark.parametrize(
    "load", [{}, {"quant_type": "fp4", "double_quant": False}], ids=["nf4-double-quant", "fp4"]
)
def test_reloads_4bit_and_equals_quantizing_the_merged_16bit_weights(base, tmp_path, load):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    model = attach_lora(load_4bit(base, **load))
    train_steps(model, tokenizer, steps=2)
    fastsave.save_pretrained_merged(model, tmp_path / "m16", tokenizer)
    with pytest.warns(UserWarning, match="re-quantizes the merged weights"):
        fastsave.save_pretrained_merged(model, tmp_path / "m4", tokenizer, save_method="merged_4bit_forced")

    config = json.loads((tmp_path / "m4" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == load.get("quant_type", "nf4")
    assert config["dtype"] == "bfloat16"

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cpu")
    merged16 = load_file(str(tmp_path / "m16" / "model.safetensors"))
    settings = Quant4bitSettings(load.get("quant_type", "nf4"), 64, load.get("double_quant", True))
    checked = 0
    for name, module in reloaded.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        codes, state = bnb_functional.quantize_4bit(
            merged16[f"{name}.weight"],
            blocksize=settings.blocksize,
            compress_statistics=settings.double_quant,
            quant_type=settings.quant_type,
        )
        assert torch.equal(module.weight.data, codes), name
        state.dtype = torch.float32
        ours = quantized_weight_source(module).float32()
        assert torch.equal(ours, bnb_functional.dequantize_4bit(codes, state)), name
        assert settings_of(module) == settings
        checked += 1
    assert checked == 14

    # identical to loading the merged 16-bit checkpoint 4-bit, so identical logits
    requantized = load_4bit(tmp_path / "m16", **load)
    reloaded.eval()
    assert torch.equal(_logits(reloaded), _logits(requantized))
    # and close to the merged 16-bit model: NF4 rounding of the merged weights is all that differs
    # (on this random tiny model cosine ~0.9; the base model without the adapter is at ~0.1)
    full = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"), dtype=torch.bfloat16))
    untrained = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16))
    assert _cosine(_logits(reloaded), full) > max(0.8, _cosine(untrained, full) + 0.4)

    # non-quantized tensors stay 16-bit; tokenizer files come along
    saved = load_file(str(tmp_path / "m4" / "model.safetensors"))
    assert (
        saved["model.norm.weight"].dtype == torch.bfloat16 and saved["lm_head.weight"].dtype == torch.bfloat16
    )
    assert (tmp_path / "m4" / "tokenizer.json").is_file()


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_same_tensors_as_a_transformers_4bit_save(base, tmp_path, storage):
    # bnb_4bit_quant_storage=bfloat16 (what FSDP needs) stores the codes as bf16: random codes form
    # NaN bit patterns there, which are codes, not values (no NaN check applies to them)
    model = attach_lora(load_4bit(base, quant_storage=storage))
    fastsave.save_pretrained_merged(model, tmp_path / "m16")
    with pytest.warns(UserWarning):
        fastsave.save_pretrained_merged(model, tmp_path / "m4", save_method="merged_4bit_forced")
    load_4bit(tmp_path / "m16", quant_storage=storage).save_pretrained(str(tmp_path / "hf4"))
    ours = load_file(str(tmp_path / "m4" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "hf4" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        if ".quant_state." in name:  # the JSON: ours is padded with spaces to its reserved length
            ours_json = json.loads(bytes(ours[name].numpy()).decode())
            assert ours_json == json.loads(bytes(tensor.numpy()).decode()), name
            assert bytes(ours[name].numpy()).decode().startswith(bytes(tensor.numpy()).decode())
        else:
            assert ours[name].dtype == tensor.dtype, name
            assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), (
                name
            )  # bits: NaN codes


def test_after_cpu_repacking(base, tmp_path):
    model = attach_lora(load_4bit(base))
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = settings_of(layer)
    _logits(model)  # on an AVX512-BF16 CPU, bitsandbytes repacks the weights in place now
    assert settings_of(layer) == before == Quant4bitSettings()
    with pytest.warns(UserWarning):
        fastsave.save_pretrained_merged(model, tmp_path / "m4", save_method="merged_4bit_forced")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cpu")
    assert sum(type(m).__name__ == "Linear4bit" for m in reloaded.modules()) == 14


@pytest.mark.parametrize(
    "shape,settings",
    [
        ((64, 128), Quant4bitSettings()),
        ((7, 9), Quant4bitSettings()),
        ((320, 64), Quant4bitSettings(blocksize=128)),
        ((40, 96), Quant4bitSettings("fp4", 64, False)),
        ((64, 64), Quant4bitSettings("nf4", 256, True, torch.bfloat16)),
        ((1000, 72), Quant4bitSettings("nf4", 32, True)),
    ],
)
def test_layout_is_known_before_quantizing(shape, settings):
    for dtype in (torch.bfloat16, torch.float16):
        weight = (torch.randn(shape) * 1e-3).to(dtype)
        codes, state = bnb_functional.quantize_4bit(
            weight,
            blocksize=settings.blocksize,
            compress_statistics=settings.double_quant,
            quant_type=settings.quant_type,
            quant_storage=settings.quant_storage,
        )
        actual = {"w": codes} | {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
        layout = quantized_layout("w", shape, dtype, settings)
        assert [n for n, _, _ in layout] == list(actual)
        for name, planned_shape, planned_dtype in layout:
            if ".quant_state." in name:  # reserved: at least the JSON's length
                assert planned_shape[0] >= actual[name].numel() and planned_dtype == torch.uint8
            else:
                assert (planned_shape, planned_dtype) == (tuple(actual[name].shape), actual[name].dtype), name


def test_padded_quant_state_json_unpacks():
    from bitsandbytes.utils import unpack_tensor_to_dict

    packed = torch.tensor(list(b'{"quant_type": "nf4", "nested_offset": 0.5}' + b" " * 24), dtype=torch.uint8)
    assert unpack_tensor_to_dict(packed) == {"quant_type": "nf4", "nested_offset": 0.5}


def test_model_without_4bit_weights_is_refused(base, tmp_path):
    from transformers import AutoModelForCausalLM

    model = attach_lora(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layer"):
        fastsave.save_pretrained_merged(model, tmp_path / "out", save_method="merged_4bit_forced")
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="blocksize"):
        Quant4bitSettings(blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        Quant4bitSettings(quant_type="int4")


def test_moe_experts_keep_the_checkpoint_layout(tmp_path):
    """Mixtral: transformers fuses the experts while loading; the 4-bit save writes them apart again,
    under the base checkpoint's names, and transformers reloads it in 4-bit with nothing missing."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    base = tmp_path / "base"
    save_random_model(config, base)
    with safe_open(base / "model.safetensors", "pt") as handle:
        base_names = set(handle.keys())
    model = attach_lora(load_4bit(base), target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        fastsave.save_pretrained_merged(model, out, save_method="merged_4bit_forced")
    with safe_open(out / "model.safetensors", "pt") as handle:
        weights = {k for k in handle.keys() if k.endswith(".weight") or k.endswith(".bias")}  # noqa: SIM118
    assert weights == base_names
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
