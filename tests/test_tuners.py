"""Every peft tuner whose layers peft can merge: merged bit-exactly against peft's own merge on a
float32 dequantized copy (tests/test_fidelity.py's oracle: no fastsave code computes the reference),
or refused by name with the reason, before anything is written."""

from __future__ import annotations

import re

import pytest
import test_fidelity
import torch
from peft import get_peft_model
from test_fidelity import _load, check_exact

import fastsave
from fastsave.errors import UnsupportedAdapterError
from fastsave.merge import dispatch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
base_dir = test_fidelity.base_dir  # the fixture: tiny random bf16 checkpoints, one per architecture

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perturb_trained(model, seed: int = 1, size: float = 0.05) -> None:
    """Move every trainable adapter tensor away from its initial value (many tuners start as the
    identity: IA3's ones, LoHa's zero factor, OFT's zero skew)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * size)


# tokens of check_exact's logits prompts, so that trained token rows change what it compares
PROMPT_TOKENS = sorted(
    set(torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))[0, :4].tolist())
)


def tuner_config(tuner: str, **overrides):
    """A peft config of ``tuner`` on the tiny Llama's linear layers."""
    import peft

    targets = overrides.pop("target_modules", ["q_proj", "v_proj", "down_proj"])
    if tuner == "IA3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=["down_proj"], **overrides)
    if tuner == "AdaLoRA":
        return peft.AdaLoraConfig(target_modules=targets, total_step=10, init_r=8, target_r=4, **overrides)
    if tuner == "VeRA":
        return peft.VeraConfig(target_modules=targets, r=16, **overrides)
    if tuner == "TrainableTokens":
        return peft.TrainableTokensConfig(
            target_modules=["embed_tokens"], token_indices=PROMPT_TOKENS, **overrides
        )
    cls = {
        "LoHa": peft.LoHaConfig,
        "LoKr": peft.LoKrConfig,
        "OFT": peft.OFTConfig,
        "BOFT": peft.BOFTConfig,
        "HRA": peft.HRAConfig,
        "FourierFT": peft.FourierFTConfig,
        "SHiRA": peft.ShiraConfig,
        "VBLoRA": peft.VBLoRAConfig,
        "RandLoRA": peft.RandLoraConfig,
        "C3A": peft.C3AConfig,
    }[tuner]
    return cls(target_modules=targets, **overrides)


# what the tiny model needs of each tuner (sizes that divide its 64 and 128 features)
OVERRIDES = {
    "VBLoRA": dict(vector_length=32),
    "C3A": dict(block_size=32),
    "FourierFT": dict(n_frequency=100),
    "SHiRA": dict(r=4),
}
STREAMED_16BIT = ["IA3", "LoHa", "LoKr", "AdaLoRA", "VeRA", "TrainableTokens", "OFT", "BOFT", "HRA"]


@pytest.mark.parametrize("tuner", STREAMED_16BIT)
def test_tuner_on_16bit_base(tuner, base_dir, tmp_path, monkeypatch):
    """Streamed: no weight goes through the whole-matrix path (it would raise here)."""
    base = base_dir()
    model = get_peft_model(_load(base, bits=None), tuner_config(tuner))
    perturb_trained(model)

    def whole_matrix(source, deltas):
        raise AssertionError(f"{tuner}: a weight was merged whole, not in row blocks")

    monkeypatch.setattr(dispatch, "merge_whole", whole_matrix)
    check_exact(model, base, tmp_path, f"{tuner} on a bf16 base")


WHOLE_MATRIX_16BIT = ["FourierFT", "SHiRA", "VBLoRA", "RandLoRA", "C3A"]


@pytest.mark.parametrize("tuner", WHOLE_MATRIX_16BIT)
def test_whole_matrix_tuner_on_16bit_base(tuner, base_dir, tmp_path):
    base = base_dir()
    model = get_peft_model(_load(base, bits=None), tuner_config(tuner, **OVERRIDES.get(tuner, {})))
    perturb_trained(model)
    check_exact(model, base, tmp_path, f"{tuner} on a bf16 base")


# peft's own forward over these quantized layers fails or is wrong (peft 0.21: dtype mismatches,
# the packed weight multiplied), so the reload's logits are held to the float32 oracle's instead
PEFT_FORWARD_BROKEN = {
    ("IA3", 4),
    ("IA3", 8),
    ("LoKr", 4),
    ("AdaLoRA", 8),
    ("SHiRA", 8),
    ("HRA", 4),
    ("HRA", 8),
}
# peft builds these adapters for the packed storage of a 4-bit weight, or cannot compute their
# delta over bitsandbytes at all: refused (test_unmergeable_quantized_adapters_are_refused)
REFUSED_QUANTIZED = {("LoHa", 4), ("RandLoRA", 4), ("RandLoRA", 8)}
QUANTIZED_CASES = [
    (tuner, bits)
    for bits in (4, 8)
    for tuner in STREAMED_16BIT + WHOLE_MATRIX_16BIT
    if (tuner, bits) not in REFUSED_QUANTIZED
]


@pytest.mark.parametrize(("tuner", "bits"), QUANTIZED_CASES)
def test_tuner_on_quantized_base(tuner, bits, base_dir, tmp_path):
    """bitsandbytes NF4 (double quantized) and LLM.int8 bases: peft cannot merge most of these into
    a quantized layer at all; the oracle merges them into the float32 dequantized copy."""
    base = base_dir()
    model = get_peft_model(_load(base, bits=bits), tuner_config(tuner, **OVERRIDES.get(tuner, {})))
    perturb_trained(model, size=0.3 if tuner == "AdaLoRA" else 0.05)  # AdaLoRA's E starts at zero
    logits_from = "oracle" if (tuner, bits) in PEFT_FORWARD_BROKEN else "peft"
    check_exact(
        model, base, tmp_path, f"{tuner} on a {'NF4' if bits == 4 else 'int8'} base", logits_from=logits_from
    )


@pytest.mark.parametrize(("tuner", "bits"), sorted(REFUSED_QUANTIZED))
def test_unmergeable_quantized_adapters_are_refused(tuner, bits, base_dir, tmp_path):
    base = base_dir()
    model = get_peft_model(_load(base, bits=bits), tuner_config(tuner, **OVERRIDES.get(tuner, {})))
    with pytest.raises(
        UnsupportedAdapterError, match=rf"(?s){tuner}.*(packs|bitsandbytes).*save_method='lora'"
    ):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tuner", ["GraLoRA", "PEANuT", "WaveFT"])
def test_more_tuners_from_peft_delta(tuner, base_dir, tmp_path):
    """Further additive tuners whose transform fastsave takes from peft's own layer (float32)."""
    import peft

    cls = {"GraLoRA": peft.GraloraConfig, "PEANuT": peft.PeanutConfig, "WaveFT": peft.WaveFTConfig}[tuner]
    extra = dict(n_frequency=64) if tuner == "WaveFT" else {}
    base = base_dir()
    model = get_peft_model(
        _load(base, bits=None), cls(target_modules=["q_proj", "v_proj", "down_proj"], **extra)
    )
    perturb_trained(model)
    check_exact(model, base, tmp_path, f"{tuner} on a bf16 base")


REFUSED_TUNERS = [
    "beft", "deft", "delora", "frod", "glora", "hira", "lily", "ln_tuning", "miss", "osf", "poly", "psoft",
    "pvera", "supertuning", "tinylora", "unilora",
]  # fmt: skip


@pytest.mark.parametrize("tuner", REFUSED_TUNERS)
def test_tuners_without_an_exact_merge_are_refused(tuner, base_dir, tmp_path):
    """Each peft tuner fastsave does not merge is refused by name, with the reason, before anything
    is written: a 'merged' checkpoint never holds an unmerged adapter."""
    import importlib
    import inspect

    from fastsave.adapters import tuners

    module = importlib.import_module(f"peft.tuners.{tuner}")
    config_class = next(
        getattr(module, attr)
        for attr in dir(module)
        if attr.endswith("Config") and inspect.isclass(getattr(module, attr))
    )
    targets = ["input_layernorm"] if tuner == "ln_tuning" else ["q_proj", "v_proj"]
    model = get_peft_model(_load(base_dir(), bits=None), config_class(target_modules=targets))
    reason = tuners.REFUSED.get(tuner, "fastsave has no exact merge for this tuner")
    with pytest.raises(
        UnsupportedAdapterError,
        match=rf"(?s){re.escape(tuners.title(tuner))}.*{re.escape(reason[:40])}.*save_method='lora'",
    ):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_several_tuners_nested_on_one_layer(base_dir, tmp_path):
    """peft's mixed model: LoRA on q_proj and v_proj, LoHa around it on q_proj and alone on
    down_proj, both active: merged in peft's order (inner layers first), bit-exact against peft's
    mixed merge in float32."""
    import copy

    import peft
    from transformers import AutoModelForCausalLM

    base = base_dir()
    configs = {
        "lora": peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "loha": peft.LoHaConfig(target_modules=["q_proj", "down_proj"], init_weights=False),
    }

    def mixed(model):
        model = get_peft_model(model, copy.deepcopy(configs["lora"]), adapter_name="lora", mixed=True)
        model.add_adapter("loha", copy.deepcopy(configs["loha"]))
        model.set_adapter(["lora", "loha"])
        return model

    model = mixed(_load(base, bits=None))
    perturb_trained(model)
    oracle = mixed(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            param.copy_(source[name].float())
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("peft.tuners.loha")
    assert type(q_proj.base_layer).__module__.startswith("peft.tuners.lora")
    check_exact(model, base, tmp_path, "LoRA + LoHa nested (peft mixed model)", oracle=oracle)


@pytest.mark.parametrize(
    ("tuner", "backend"),
    # peft attaches IA3 and LoHa to nn.Linear only, not to HQQ's HQQLinear
    [("OFT", "hqq"), ("IA3", "torchao"), ("LoHa", "torchao"), ("OFT", "torchao")],
)
def test_tuners_on_hqq_and_torchao_bases(tuner, backend, base_dir, tmp_path):
    """Other tuners over weights quantized by HQQ or torchao: W from the backend's own dequantize
    (tests/test_fidelity.py's oracles for those bases), peft's float32 merge on top."""

    from test_fidelity import _affine_dequantize, _auto, build_oracle, hqq_dequantized

    base = base_dir()
    dequantized = {}
    if backend == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        model = _auto("llama").from_pretrained(base, dtype=torch.bfloat16)
        AutoHQQHFModel.quantize_model(
            model,
            quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
            compute_dtype=torch.bfloat16,
            device="cpu",
        )
        model = get_peft_model(model, tuner_config(tuner))
        dequantized = hqq_dequantized(model)
    else:
        import torchao.quantization as tq
        from transformers import TorchAoConfig

        model = _auto("llama").from_pretrained(
            base,
            quantization_config=TorchAoConfig(tq.Int8WeightOnlyConfig()),
            device_map="cpu",
            dtype=torch.bfloat16,
        )
        model = get_peft_model(model, tuner_config(tuner))
        for name, param in model.named_parameters():
            if hasattr(param, "qdata"):
                dequantized[name] = _affine_dequantize(param)
    perturb_trained(model)
    assert dequantized
    oracle = build_oracle(model, base, dequantized=dequantized)
    check_exact(model, base, tmp_path, f"{tuner} on a {backend} base", oracle=oracle, logits_from="oracle")
