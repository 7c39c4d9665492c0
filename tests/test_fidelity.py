"""Fidelity of merged_16bit across architectures, adapter options and quantized bases (issue 4).

Every exactness test compares fastsave's output with an independent oracle: the same architecture
built in float32, each quantized weight replaced by bitsandbytes' own float32 dequantization, the
same adapter weights loaded into a peft model over it, peft's ``merge_and_unload``, and
``save_pretrained`` of the merged float32 model (so the tensor names are what transformers writes
for the architecture), rounded once to the output dtype. The comparison is ``torch.equal`` on every
tensor. Each saved directory is also reloaded with plain transformers (no peft, no bitsandbytes)
and its logits compared with the peft model's.

The oracle unties tied input/output embeddings before merging: peft's in-place merge into a shared
embedding would otherwise change both sides, which is not what the peft model computes.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from conftest import FIDELITY_LOGITS, FIDELITY_MATRIX
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BitsAndBytesConfig,
    GemmaConfig,
    GPT2Config,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    T5Config,
)

import fastsave
from fastsave.errors import PlanError, UnsupportedAdapterError
from fastsave.inputs.live_model import LiveModelInput
from fastsave.options import parse_options
from fastsave.plan.walk import unwrap_peft
from fastsave.tiny import attach_lora, tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Filled by check_exact, printed after the run by conftest's terminal summary: case -> (max abs
# error of the output, bit-exact, the same two for the float32 merge before rounding); LOGITS:
# reload-vs-peft logits error as a fraction of how far the adapter moves the logits.
FIDELITY = FIDELITY_MATRIX
LOGITS = FIDELITY_LOGITS

_DECODER = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _config(arch: str, tie: bool | None = None):
    if arch == "llama":
        return tiny_llama_config(tie_word_embeddings=bool(tie))
    if arch == "mistral":
        return MistralConfig(**_DECODER, tie_word_embeddings=bool(tie))
    if arch == "qwen2":
        return Qwen2Config(**_DECODER, tie_word_embeddings=bool(tie))
    if arch == "gemma":  # ties its embeddings by default
        return GemmaConfig(**_DECODER, head_dim=16, tie_word_embeddings=True if tie is None else tie)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**_DECODER, tie_word_embeddings=bool(tie))
    if arch == "mixtral":  # transformers fuses the experts while loading; the checkpoint keeps them apart
        return MixtralConfig(
            **_DECODER, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=bool(tie)
        )
    if arch == "qwen2_moe":  # fused experts plus a shared expert
        moe = dict(_DECODER, intermediate_size=128)
        return Qwen2MoeConfig(
            **moe,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        )
    if arch == "hrm_text":  # the checkpoint fuses gate+q+k+v and gate+up, transformers splits them on load
        from transformers import HrmTextConfig  # a recent architecture: imported only where it runs

        return HrmTextConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, tie_word_embeddings=bool(tie),
        )  # fmt: skip
    if arch == "gpt2":  # Conv1D layers, tied lm_head
        return GPT2Config(
            vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    if arch == "bert":  # encoder, MLM head tied to the word embeddings
        return BertConfig(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
    if arch == "t5":  # encoder-decoder, shared embeddings
        return T5Config(
            vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    raise ValueError(arch)


def _auto(arch: str):
    return {"bert": AutoModelForMaskedLM, "t5": AutoModelForSeq2SeqLM}.get(arch, AutoModelForCausalLM)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Factory: a random bf16 checkpoint of a tiny architecture on local disk, built once per module."""
    cache: dict[tuple[str, bool | None], Path] = {}

    def make(arch: str = "llama", tie: bool | None = None) -> Path:
        key = (arch, tie)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"base-{arch}-{tie}")
            torch.manual_seed(0)
            _auto(arch).from_config(_config(arch, tie), dtype=torch.bfloat16).save_pretrained(directory)
            cache[key] = directory
        return cache[key]

    return make


def _load(
    directory: Path,
    arch: str = "llama",
    bits: int | None = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage: torch.dtype = torch.uint8,
    compute: torch.dtype = torch.bfloat16,
    device_map: str = "cpu",
):
    """The base loaded 4-bit, 8-bit (LLM.int8) or unquantized (bits=None) in ``compute`` dtype, on
    ``device_map`` (tests/test_cuda.py loads the same bases onto a GPU)."""
    kwargs = {}
    if bits == 4:
        # bitsandbytes' CPU 4-bit kernel cannot run a layer with 1 output (Qwen2-MoE's shared_expert_gate)
        skip = ["lm_head", "shared_expert_gate"] if arch == "qwen2_moe" else None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            llm_int8_skip_modules=skip,
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=storage,
        )
    elif bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return _auto(arch).from_pretrained(directory, dtype=compute, device_map=device_map, **kwargs)


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Make every trained tensor non-trivial: DoRA magnitudes, lora biases, modules_to_save copies."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
            elif ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.05)


# --------------------------------------------------------------------------------------------
# The oracle: bitsandbytes' dequantize + peft's merge_and_unload in float32, saved by transformers.


def _dequantize_4bit(param, absmax_to_bf16: bool = False) -> torch.Tensor:
    state = copy.copy(param.quant_state)
    state.dtype = torch.float32
    if absmax_to_bf16:  # what bitsandbytes' CPU repacking keeps (docs/ARCHITECTURE.md)
        absmax = state.absmax
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(absmax, state.state2) + state.offset
        state.absmax = absmax.float().to(torch.bfloat16).float()
        state.nested = False
    return bnb_functional.dequantize_4bit(param.data.view(torch.uint8), state)


def _dequantize_8bit(param, module) -> torch.Tensor:
    scb = param.SCB if getattr(param, "SCB", None) is not None else module.state.SCB
    return bnb_functional.int8_vectorwise_dequant(param.data, scb.float()).float()


def build_oracle(
    peft_model,
    base: Path,
    arch: str = "llama",
    absmax_to_bf16: bool = False,
    dequantized: dict[str, torch.Tensor] | None = None,
    vocab_size: int | None = None,
):
    """A float32 peft model holding the same (dequantized) weights and adapters as ``peft_model``.

    ``dequantized``: parameter name -> float32 weight, for bases whose weights this function cannot
    dequantize itself (HQQ, torchao): the test computes them with the backend's own API.
    ``vocab_size``: the model's embeddings were resized (added tokens): resize the copy the same
    way before the adapter is attached (the new rows are then copied from the model).
    """
    f32 = _auto(arch).from_pretrained(base, dtype=torch.float32)
    if vocab_size is not None:
        f32.resize_token_embeddings(vocab_size)
    out_emb = f32.get_output_embeddings()
    if out_emb is not None and out_emb.weight is f32.get_input_embeddings().weight:
        out_emb.weight = nn.Parameter(out_emb.weight.detach().clone())  # see the module docstring
    configs = peft_model.peft_config
    names = list(configs)
    oracle = get_peft_model(f32, copy.deepcopy(configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        oracle.add_adapter(name, copy.deepcopy(configs[name]))
    source = dict(peft_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in oracle.named_parameters(remove_duplicate=False):
            if dequantized is not None and name in dequantized:
                param.copy_(dequantized[name])
                continue
            src = source[name]
            owner = peft_model.get_submodule(name.rsplit(".", 1)[0])
            kind = type(src).__name__
            if kind == "Params4bit":
                value = _dequantize_4bit(src, absmax_to_bf16)
            elif kind == "Int8Params":
                value = _dequantize_8bit(src, owner)
            else:
                value = src.detach().float()
            source_cls = getattr(owner, "source_cls", None)
            if source_cls is not None and source_cls.__name__ == "Conv1D":
                value = value.T  # transformers transposed the Conv1D weight to quantize it
            param.copy_(value)
        # an adapter's own buffers (VeRA's shared projections, RandLoRA's bases) as the model holds them
        buffers = dict(peft_model.named_buffers(remove_duplicate=False))
        for name, buffer in oracle.named_buffers(remove_duplicate=False):
            if name in buffers and ".base_layer." not in name and _is_adapter_buffer(name):
                buffer.copy_(buffers[name].to(buffer.dtype))
    active = peft_model.base_model.active_adapter
    oracle.base_model.set_adapter(active if isinstance(active, list) else [active])
    return oracle


def _is_adapter_buffer(name: str) -> bool:
    """A buffer of a peft tuner layer (not of the model it wraps)."""
    return any(
        f".{part}." in name for part in ("vera_A", "vera_B", "randlora_A", "randlora_B", "vblora_vector_bank")
    )


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _logits(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if arch == "t5":
            return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits.float()
        return model(input_ids=ids).logits.float()


def fastsave_float32_merges(peft_model, adapter_names=None) -> dict[str, torch.Tensor]:
    """fastsave's merge before any rounding: its plan with float32 output, LoRA module -> merged weight.

    Keyed by the LoRA module's name; the value is the tensor under the name the plan writes it.
    """
    opts = parse_options("unused-directory", dtype=torch.float32, adapter_names=adapter_names)
    plan = LiveModelInput(peft_model).merged_plan(opts)
    return {item.lora_module: (item.name, item.produce()) for item in plan.items if item.lora_module}


def _merged_parameter(merged: nn.Module, tensor_name: str) -> torch.Tensor:
    """The tensor of peft's merged model named ``tensor_name`` (a weight or a bare parameter)."""
    module, _, attr = tensor_name.rpartition(".")
    return getattr(merged.get_submodule(module), attr)


def _reference_logits(model, arch: str, ids: torch.Tensor, adapter_names) -> tuple[torch.Tensor, float]:
    """A peft model's logits for ``ids``, and how far its adapters move them."""
    model.eval()
    if adapter_names:
        model.base_model.set_adapter(list(adapter_names))
    want = _logits(model, arch, ids)
    with model.disable_adapter():
        effect = (_logits(model, arch, ids) - want).abs().max().item()
    return want, effect


def check_exact(
    peft_model,
    base: Path,
    tmp_path: Path,
    case: str,
    arch: str = "llama",
    oracle=None,
    expect_exact: bool = True,
    logits_tolerance: float = 0.25,
    logits_from: str = "peft",
    **save_kwargs,
) -> dict:
    """Save with fastsave, compare every tensor with the oracle, reload with plain transformers.

    ``logits_from``: whose logits the reload is held to: the peft model's ("peft"), or, where peft's
    own forward cannot run over that quantized layer, the float32 oracle's before it merges ("oracle").
    Returns the output's config.json.
    """
    oracle = oracle if oracle is not None else build_oracle(peft_model, base, arch)
    ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    if logits_from == "oracle":  # before it merges; the peft model's own are taken after the save
        want_logits, effect = _reference_logits(oracle, arch, ids, save_kwargs.get("adapter_names"))
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(peft_model, out, **save_kwargs)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    out_dtype = getattr(torch, config["dtype"])
    # fastsave's float32 merge, before rounding, for the float32 comparison below
    ours32 = fastsave_float32_merges(peft_model, save_kwargs.get("adapter_names")).values()

    merged = oracle.merge_and_unload(adapter_names=save_kwargs.get("adapter_names"))
    worst32, exact32 = 0.0, True
    for tensor_name, weight in ours32:
        want = _merged_parameter(merged, tensor_name)
        if not torch.equal(weight, want):
            exact32 = False
            worst32 = max(worst32, (weight - want).abs().max().item())
    tie = bool(config.get("tie_word_embeddings", False))
    out_emb = merged.get_output_embeddings()
    if tie and out_emb is not None:
        # written once: only right when the two sides really are identical after merging
        assert torch.equal(out_emb.weight, merged.get_input_embeddings().weight)
        out_emb.weight = merged.get_input_embeddings().weight
    merged.config.tie_word_embeddings = tie
    reference_dir = tmp_path / "reference"
    merged.save_pretrained(reference_dir)
    reference = _saved(reference_dir)

    got = _saved(out)
    assert set(got) == set(reference), (sorted(set(got) - set(reference)), sorted(set(reference) - set(got)))
    worst, exact = 0.0, True
    for name, expected in reference.items():
        expected = expected.to(out_dtype) if expected.is_floating_point() else expected
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        if not torch.equal(got[name], expected):
            exact = False
            worst = max(worst, (got[name].float() - expected.float()).abs().max().item())
    FIDELITY[case] = (worst, exact, worst32, exact32)
    if expect_exact:
        assert exact32, f"{case}: float32 merge differs from peft's, max abs error {worst32}"
        assert exact, f"{case}: not bit-exact, max abs error {worst}"

    # Plain transformers reload: no missing / unexpected / mismatched tensor, logits like the peft model.
    reloaded, info = _auto(arch).from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if logits_from == "peft":
        want_logits, effect = _reference_logits(peft_model, arch, ids, save_kwargs.get("adapter_names"))
    diff = (_logits(reloaded, arch, ids) - want_logits).abs().max().item()
    LOGITS[case] = diff / effect
    # the peft model computes in 4-bit/bf16, the reload in float32: close, and far closer than without adapter
    assert diff <= logits_tolerance * effect, (
        f"reloaded logits differ by {diff}; the adapter moves them {effect}"
    )
    return config


# --------------------------------------------------------------------------------------------
# Architectures


# attention and (Qwen2-MoE) the shared expert: the linears of an MoE model that peft's LoRA wraps
MOE_TARGETS = {
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize(
    "arch",
    ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "bert", "t5", "mixtral", "qwen2_moe", "hrm_text"],
)
def test_architectures_nf4(arch, base_dir, tmp_path):
    """LoRA on every linear layer of a 4-bit model; GPT-2's Conv1D layers are quantized too.

    MoE models: transformers fuses their experts into 3D parameters while loading (not quantized,
    not nn.Linear), and the checkpoint must come out in the layout it was read from, experts apart;
    HrmText the other way round: its checkpoint fuses projections that the model holds apart.
    """
    base = base_dir(arch)
    targets = {}
    if arch in MOE_TARGETS:
        targets = dict(target_modules=MOE_TARGETS[arch])
    model = attach_lora(_load(base, arch), seed=3, **targets)
    config = check_exact(model, base, tmp_path, f"arch {arch} nf4", arch=arch)
    if arch in ("gemma", "gpt2", "bert", "t5"):
        assert config["tie_word_embeddings"] is True  # no adapter on either side: written once


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_over_16bit_base(use_dora, base_dir, tmp_path):
    """GPT-2 over an unquantized base: peft's Conv1D LoRA with fan_in_fan_out=True (and DoRA over it)."""
    base = base_dir("gpt2")
    model = _load(base, "gpt2", bits=None)
    model = attach_lora(
        model, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=use_dora
    )
    assert model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    _perturb(model)
    check_exact(model, base, tmp_path, f"gpt2 Conv1D 16-bit base{' DoRA' if use_dora else ''}", arch="gpt2")


def test_gpt2_8bit(base_dir, tmp_path):
    """transformers quantizes GPT-2's Conv1D to Linear8bitLt too: the output goes back to the (in, out) layout."""
    base = base_dir("gpt2")
    model = attach_lora(_load(base, "gpt2", bits=8))
    check_exact(model, base, tmp_path, "gpt2 8-bit", arch="gpt2")


# --------------------------------------------------------------------------------------------
# LoRA options


def test_rslora(base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base), r=4, alpha=32, use_rslora=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 32 / 2  # alpha / sqrt(r)
    check_exact(model, base, tmp_path, "rslora")


def test_dora(base_dir, tmp_path):
    """DoRA on the 4-bit linears and on the (16-bit) embedding: magnitude / ||W + dW|| of the unmerged W."""
    base = base_dir()
    model = attach_lora(
        _load(base), use_dora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]
    )
    _perturb(model)
    check_exact(model, base, tmp_path, "DoRA (linear 4-bit + embedding)")


def test_lora_bias(base_dir, tmp_path):
    """lora_bias=True: the trained bias of lora_B is folded into the base bias (Qwen2 q/k/v have biases)."""
    base = base_dir("qwen2")
    model = attach_lora(_load(base, "qwen2"), target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    _perturb(model)
    check_exact(model, base, tmp_path, "lora_bias", arch="qwen2")


def test_lora_bias_without_base_bias_is_refused(base_dir, tmp_path):
    """A lora_B bias on a layer the architecture gives no bias cannot be saved as a plain checkpoint."""
    base = base_dir("qwen2")
    model = attach_lora(_load(base, "qwen2"), target_modules=["q_proj", "o_proj"], lora_bias=True)
    _perturb(model)
    with pytest.raises(UnsupportedAdapterError, match=r"o_proj.*lora_bias"):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _two_adapters(base: Path, use_dora: bool = False):
    model = attach_lora(
        _load(base), seed=1, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=use_dora
    )
    from peft import LoraConfig

    torch.manual_seed(2)
    second = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "o_proj"], use_dora=use_dora
    )
    model.add_adapter("second", second)
    _perturb(model)
    return model


def test_dora_over_an_already_merged_adapter_is_refused(base_dir, tmp_path):
    """DoRA's norm needs the unmerged weight, which a base holding a merged adapter no longer is."""
    from peft import LoraConfig

    model = attach_lora(_load(base_dir(), bits=None), target_modules=["q_proj"])
    dora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"], use_dora=True)
    model.add_adapter("second", dora)
    model.base_model.set_adapter(["default", "second"])
    model.base_model.merge_adapter(["default"])
    with pytest.raises(UnsupportedAdapterError, match=r"q_proj.*DoRA.*already merged"):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_several_adapters_active(base_dir, tmp_path):
    base = base_dir()
    model = _two_adapters(base)
    model.base_model.set_adapter(["default", "second"])
    check_exact(model, base, tmp_path, "two adapters active")


def test_adapter_names_picks_some(base_dir, tmp_path):
    base = base_dir()
    model = _two_adapters(base)  # only "default" active
    check_exact(model, base, tmp_path, "adapter_names=['second']", adapter_names=["second"])


def _peft_definition_float32(layer, adapters) -> torch.Tensor:
    """W + deltas for one float32 peft layer from peft's own pieces, DoRA norms on the unmerged W."""
    from peft.utils.other import transpose

    w0 = layer.get_base_layer().weight.detach().clone()
    weight = w0.clone()
    for adapter in adapters:
        if adapter not in layer.lora_A:
            continue
        delta = layer.get_delta_weight(adapter)
        if adapter in layer.lora_variant:
            magnitude = layer.lora_magnitude_vector[adapter]
            norm = magnitude.get_weight_norm(w0, transpose(delta, layer.fan_in_fan_out), scaling=1)
            factor = transpose((magnitude.weight / norm).view(-1, 1), layer.fan_in_fan_out)
            weight = factor * (weight + delta)
        else:
            weight = weight + delta
    return weight


def test_several_dora_adapters(base_dir, tmp_path):
    """Two DoRA adapters: the second's factor scales the first merge, its norm uses the unmerged W
    (peft's merge and its eval forward agree on this). peft's float32 merge_and_unload unmerges and
    re-merges the first adapter to get that W, which rounds: fastsave is compared bit for bit with
    peft's definition computed from the exact W, and the max error against merge_and_unload is reported."""
    base = base_dir()
    model = _two_adapters(base, use_dora=True)
    model.base_model.set_adapter(["default", "second"])
    oracle = build_oracle(model, base)
    adapters = ["default", "second"]
    definition = {
        name: _peft_definition_float32(module, adapters)
        for name, module in unwrap_peft(oracle).named_modules()
        if hasattr(module, "lora_magnitude_vector") and module.lora_magnitude_vector
    }
    for name, (_, weight) in fastsave_float32_merges(model).items():
        assert torch.equal(weight, definition[name]), name
    check_exact(model, base, tmp_path, "two DoRA adapters active", oracle=oracle, expect_exact=False)
    got = _saved(tmp_path / "out")
    for name, weight in definition.items():
        assert torch.equal(got[name + ".weight"], weight.to(torch.bfloat16)), name
    assert FIDELITY["two DoRA adapters active"][2] < 1e-6


def test_modules_to_save_replace_original(base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base), target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])
    _perturb(model)
    check_exact(model, base, tmp_path, "modules_to_save (lm_head, norm)")
    got = _saved(tmp_path / "out")
    trained = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(got["lm_head.weight"], trained.to(got["lm_head.weight"].dtype))


def test_lora_on_embed_tokens_and_lm_head(base_dir, tmp_path):
    """Untied Llama: LoRA on the embedding and on lm_head, whose base stays 16-bit in a 4-bit model."""
    base = base_dir()
    model = attach_lora(_load(base), target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert type(model.base_model.model.lm_head).__name__ == "Linear"  # peft's 16-bit lora.Linear
    check_exact(model, base, tmp_path, "LoRA on embed_tokens + 16-bit lm_head, 4-bit model")


@pytest.mark.parametrize(
    ("case", "lora_kwargs", "tied"),
    [
        ("no adapter on either side", dict(), True),
        ("LoRA on lm_head", dict(target_modules=["lm_head"]), False),
        ("LoRA on embed_tokens", dict(target_modules=["embed_tokens"]), False),
        ("LoRA on both", dict(target_modules=["embed_tokens", "lm_head"]), False),
        ("modules_to_save lm_head", dict(modules_to_save=["lm_head"]), False),
        ("modules_to_save embed_tokens", dict(modules_to_save=["embed_tokens"]), False),
    ],
)
def test_tied_embeddings(case, lora_kwargs, tied, base_dir, tmp_path):
    """Gemma ties lm_head to embed_tokens: written once while identical, both + tie false once they differ."""
    base = base_dir("gemma")
    extra = lora_kwargs.pop("target_modules", [])
    model = attach_lora(
        _load(base, "gemma"), target_modules=["q_proj", "v_proj", "up_proj", *extra], **lora_kwargs
    )
    _perturb(model)
    config = check_exact(model, base, tmp_path, f"tied Gemma: {case}", arch="gemma")
    assert config["tie_word_embeddings"] is tied
    got = _saved(tmp_path / "out")
    assert ("lm_head.weight" in got) is (not tied)
    if not tied:
        # the reload must use the adapted head, not the embedding: a tied reload would be far off
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
        ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
        want = _logits(model, "gemma", ids)
        right = (_logits(reloaded, "gemma", ids) - want).abs().max()
        reloaded.lm_head.weight = reloaded.model.embed_tokens.weight  # what a wrongly tied reload computes
        wrong = (_logits(reloaded, "gemma", ids) - want).abs().max()
        assert right < wrong / 4, (right, wrong)


# --------------------------------------------------------------------------------------------
# Bases


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bases(quant_type, double_quant, base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base, quant_type=quant_type, double_quant=double_quant))
    check_exact(model, base, tmp_path, f"{quant_type} double_quant={double_quant}")


def test_quant_storage_bfloat16(base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base, storage=torch.bfloat16))
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.dtype == torch.bfloat16
    check_exact(model, base, tmp_path, "nf4 quant_storage=bfloat16")


def test_8bit_base(base_dir, tmp_path):
    """LLM.int8 runs on CPU with this bitsandbytes: W = int8 codes * SCB / 127, as bitsandbytes dequantizes."""
    base = base_dir()
    model = attach_lora(_load(base, bits=8))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    check_exact(model, base, tmp_path, "8-bit LLM.int8")


def test_16bit_base(base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base, bits=None))
    check_exact(model, base, tmp_path, "unquantized bf16 base")


# --------------------------------------------------------------------------------------------
# Other quantized bases peft trains LoRA on: HQQ and torchao, each dequantized by its own API


_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hqq_dequantized(model) -> dict[str, torch.Tensor]:
    """Every HQQLinear's weight by hqq's own dequantize, on a copy whose scale, zero and compute
    dtype are float32: parameter name -> float32 weight (build_oracle's ``dequantized``)."""
    from hqq.core.quantize import HQQLinear

    dequantized = {}
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            float32 = copy.deepcopy(module)
            float32.meta = {
                k: (v.float() if k in ("scale", "zero") and torch.is_tensor(v) else v)
                for k, v in module.meta.items()
            }
            float32.meta["compute_dtype"] = float32.compute_dtype = torch.float32
            dequantized[f"{name}.weight"] = float32.dequantize().float()
    return dequantized


@pytest.mark.parametrize("nbits", [4, 8])
def test_hqq_base(nbits, base_dir, tmp_path):
    """hqq's HQQLinear (the hqq package's own quantizer, CPU backend): W = hqq's dequantize in float32."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    base = base_dir()
    model = _auto("llama").from_pretrained(base, dtype=torch.bfloat16)
    AutoHQQHFModel.quantize_model(
        model,
        quant_config=BaseQuantizeConfig(nbits=nbits, group_size=64),
        compute_dtype=torch.bfloat16,
        device="cpu",
    )
    model = attach_lora(model, target_modules=_LINEARS)
    dequantized = hqq_dequantized(model)
    assert len(dequantized) == 14
    oracle = build_oracle(model, base, dequantized=dequantized)
    check_exact(model, base, tmp_path, f"HQQ {nbits}-bit (group 64)", oracle=oracle)
    _lora_save_is_peft_own(model, tmp_path)


def _lora_save_is_peft_own(model, tmp_path: Path) -> None:
    """save_method='lora' writes what peft's own save_pretrained writes, byte for byte."""
    model.save_pretrained(tmp_path / "peft-adapter")
    fastsave.save_pretrained_merged(model, tmp_path / "lora", save_method="lora")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "lora" / name).read_bytes() == (tmp_path / "peft-adapter" / name).read_bytes(), (
            name
        )


def _affine_dequantize(tensor) -> torch.Tensor:
    """torchao's affine int dequantization written out: (q - zero_point) * scale per block, in float32."""
    q = tensor.qdata.to(torch.int32)
    rows = q.shape[0]
    block_rows, block_cols = tensor.block_size
    scale = tensor.scale.float().reshape(rows // block_rows, -1)
    zero = getattr(tensor, "zero_point", None)
    if zero is not None:
        zero = zero.to(torch.int32).reshape(scale.shape)
        zero = zero.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
        q = q - zero
    return q.to(torch.float32) * scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)


@pytest.mark.parametrize("config", ["int8 weight-only", "int4 weight-only (IntxWeightOnlyConfig)"])
def test_torchao_base(config, base_dir, tmp_path):
    """torchao weight-only quantized linears (transformers' TorchAoConfig): W = torchao's dequantization."""
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    if config.startswith("int8"):
        quant = tq.Int8WeightOnlyConfig()
    else:
        quant = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    base = base_dir()
    model = _auto("llama").from_pretrained(
        base, quantization_config=TorchAoConfig(quant), device_map="cpu", dtype=torch.bfloat16
    )
    model = attach_lora(model, target_modules=_LINEARS)
    dequantized = {}
    for name, param in model.named_parameters():
        if hasattr(param, "qdata"):  # a torchao quantized weight
            expected = _affine_dequantize(param)
            if "output_dtype" in str(inspect.signature(type(param).dequantize)):
                assert torch.equal(param.dequantize(output_dtype=torch.float32), expected), name
            dequantized[name] = expected
    from peft.tuners.lora import LoraLayer

    wrapped = {f"{n}.base_layer.weight" for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == 2 * len(_LINEARS)  # every projection of the two layers: all torchao-quantized
    assert set(dequantized) == wrapped
    oracle = build_oracle(model, base, dequantized=dequantized)
    check_exact(model, base, tmp_path, f"torchao {config}", oracle=oracle)
    _lora_save_is_peft_own(model, tmp_path)


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "storage"),
    [("nf4", True, torch.uint8), ("fp4", False, torch.uint8), ("nf4", False, torch.bfloat16)],
)
def test_cpu_repacked_state(quant_type, double_quant, storage, base_dir, tmp_path, monkeypatch):
    """The layout bitsandbytes' CPU forward leaves on an AVX512-BF16 machine (absmax kept in bf16),
    made with bitsandbytes' own conversion function so that it is tested on every CPU."""
    from bnb_layouts import is_repacked, linear4bit_layers, repack_for_cpu, run_repacked_anywhere

    base = base_dir()
    model = attach_lora(_load(base, quant_type=quant_type, double_quant=double_quant, storage=storage))
    oracle = build_oracle(model, base, absmax_to_bf16=True)  # from the weights before they are repacked
    repack_for_cpu(model)
    assert all(is_repacked(layer) for layer in linear4bit_layers(model))
    run_repacked_anywhere(monkeypatch)  # check_exact runs the model: bnb's kernel needs AVX512-BF16
    check_exact(
        model, base, tmp_path, f"CPU-repacked {quant_type} dq={double_quant} {storage}", oracle=oracle
    )


# --------------------------------------------------------------------------------------------
# Output dtype


@pytest.mark.parametrize(
    ("compute", "dtype"),
    [(torch.bfloat16, torch.float16), (torch.float16, None), (torch.float16, torch.bfloat16)],
)
def test_output_dtypes(compute, dtype, base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base, compute=compute))
    config = check_exact(model, base, tmp_path, f"compute {compute} -> dtype={dtype}", dtype=dtype)
    assert config["dtype"] == str(dtype or compute).removeprefix("torch.")


def test_float16_overflow_is_an_error(base_dir, tmp_path):
    base = base_dir()
    model = attach_lora(_load(base), target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(0.0)
        layer.lora_A["default"].weight[0, 0] = 1.0
        layer.lora_B["default"].weight[3, 0] = 1e5  # one merged value near 2e5: fine in bf16, not in fp16
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*float16"):
        fastsave.save_pretrained_merged(model, out, dtype=torch.float16)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging left behind either
    fastsave.save_pretrained_merged(model, out, dtype=torch.bfloat16)
    assert _saved(out)["model.layers.1.self_attn.q_proj.weight"].float().abs().max() > 65504


def test_float16_overflow_in_a_plain_tensor(base_dir, tmp_path):
    """Not only merged weights: any tensor rounded to float16 is checked (here a norm weight)."""
    model = attach_lora(_load(base_dir()), target_modules=["q_proj"])
    with torch.no_grad():
        model.base_model.model.model.layers[0].post_attention_layernorm.weight[2] = 7e4
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"model\.layers\.0\.post_attention_layernorm\.weight.*float16"):
        fastsave.save_pretrained_merged(model, out, dtype=torch.float16)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Safety nets


def test_skipped_lora_module_is_an_error(base_dir, tmp_path, monkeypatch):
    """If the merge missed a LoRA module, the independent count catches it and names it."""
    import fastsave.plan.walk as walk_module

    real = walk_module.select_adapters
    model = attach_lora(_load(base_dir()))
    skipped = model.base_model.model.model.layers[1].mlp.down_proj

    def drop_one(layer, adapter_names):
        return ((), ()) if layer is skipped else real(layer, adapter_names)

    monkeypatch.setattr(walk_module, "select_adapters", drop_one)
    out = tmp_path / "out"
    with pytest.raises(
        PlanError, match=r"13 merged modules.*14 LoRA modules.*model\.layers\.1\.mlp\.down_proj"
    ):
        fastsave.save_pretrained_merged(model, out)
    assert not out.exists()


def test_unrecognised_lora_layer_is_an_error(base_dir, tmp_path, monkeypatch):
    """A LoRA layer the walk does not recognise would leak base_layer / lora_ tensors: refused."""
    import fastsave.plan.walk as walk_module

    real = walk_module.is_adapter_layer
    monkeypatch.setattr(
        walk_module, "is_adapter_layer", lambda m: real(m) and "Embedding" not in type(m).__name__
    )
    model = attach_lora(_load(base_dir()), target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(PlanError, match="embed_tokens"):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_merged_weight_is_an_error(base_dir, tmp_path):
    model = attach_lora(_load(base_dir()))
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight[5, 1] = float("nan")
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*NaN"):
        fastsave.save_pretrained_merged(model, out)
    assert not out.exists()


def test_inf_in_lora_b_is_an_error(base_dir, tmp_path):
    model = attach_lora(_load(base_dir()), target_modules=["lm_head", "q_proj"])
    with torch.no_grad():
        model.base_model.model.lm_head.lora_B["default"].weight[7, 0] = float("inf")
    with pytest.raises(PlanError, match=r"lm_head\.weight.*(NaN|Inf)"):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "lora_kwargs"),
    [
        ("router", dict(target_modules="all-linear")),  # peft wraps the router's 2D weight parameter
        (
            "fused experts",
            dict(
                target_modules=["q_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        ),
    ],
)
def test_lora_on_moe_parameters(case, lora_kwargs, base_dir, tmp_path):
    """LoRA on bare parameters (peft's ParamWrapper, nested for two parameters of one module): the
    3D expert stacks get one rank-r delta per expert, then are written apart per expert."""
    base = base_dir("mixtral")
    model = attach_lora(_load(base, "mixtral"), seed=5, **lora_kwargs)
    assert any(type(m).__name__ == "ParamWrapper" for m in model.modules())
    check_exact(model, base, tmp_path, f"Mixtral LoRA on {case} (ParamWrapper)", arch="mixtral")
    changed = "block_sparse_moe.gate" if case == "router" else "block_sparse_moe.experts.1.w3"
    name = f"model.layers.0.{changed}.weight"
    assert not torch.equal(_saved(tmp_path / "out")[name], _saved(base)[name])  # the delta is in


def test_fused_experts_spilled_to_disk_under_a_tiny_budget(base_dir, tmp_path, monkeypatch):
    """With almost no memory allowed, the merged expert stacks that the checkpoint-layout step needs
    whole are assembled in spilled files instead of memory: still bit-exact, and nothing is left."""
    from fastsave import memory
    from fastsave.merge import assemble

    spilled = []
    real_buffer = assemble.Assembler.buffer

    def counting(self, shape, dtype, **options):
        tensor = real_buffer(self, shape, dtype, **options)
        if self.spilled_bytes:
            spilled.append(shape)
        return tensor

    # a process that may hold 128 KiB more than it does when the save starts: a 64 KiB allowance,
    # every tensor a step needs whole is spilled
    monkeypatch.setattr(
        memory, "memory_limit", lambda: int((memory.anonymous_memory() + 128 * 1024) / memory_fraction)
    )
    monkeypatch.setattr(memory, "MIN_ALLOWANCE", 64 * 1024)
    monkeypatch.setattr(assemble.Assembler, "buffer", counting)
    base = base_dir("mixtral")
    lora = dict(
        target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    model = attach_lora(_load(base, "mixtral"), seed=5, **lora)
    memory_fraction = parse_options(tmp_path / "x").maximum_memory_usage  # the default the save uses
    check_exact(model, base, tmp_path, "Mixtral fused experts, spilled (64 KiB budget)", arch="mixtral")
    assert spilled, "nothing was spilled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]
