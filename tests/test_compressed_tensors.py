"""save_method="fp8" ... "mxfp4a16": compressed-tensors checkpoints for vLLM, bit-identical to llm-compressor.

The oracle (tests/compressed_oracle.py) is compressed-tensors' own observer arithmetic, qparams and
compressors applied to the merged_16bit checkpoint of the same model; fastsave's output must equal
it bit for bit, tensor for tensor, and load back through transformers and compressed-tensors.
(scripts/compare_llmcompressor.py holds the same outputs to llm-compressor's real ``oneshot`` in
its own environment.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from compressed_oracle import compress, decompress, same_bits
from safetensors.torch import load_file

import fastsave
from fastsave.cli.merge import add_merge_parser
from fastsave.compressed_schemes import SCHEMES
from fastsave.errors import PlanError
from fastsave.formats import compressed_arithmetic, compressed_tensors
from fastsave.tiny import (
    attach_lora,
    build_tiny_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
    train_steps,
)

INPUT = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 5]])
METHODS = sorted(SCHEMES)
# the sibling projections that share NVFP4's global scale in a Llama layer
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


def _adversarial(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights plus the cases rounding gets wrong: zeros, -0.0, subnormals, ties, huge and tiny rows."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[0] = 0.0  # an all-zero row: every scale of it is the epsilon
    weight[1, : cols // 2] = -0.0
    weight[2, :16] = 1e-40  # subnormal in float32 / bfloat16
    weight[3] *= 1e4
    weight[4] *= 1e-6
    # ties: values at the midpoints of FP4's and the integer grids once divided by the row's scale
    fractions = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -2.5, 0.5, 1.5])
    weight[5, :12] = fractions / 6.0
    weight[5, 12:16] = -1.0
    weight[6, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 7.0, -8.0, 3.5]) / 7.5
    weight[7, :] = weight[7, :].abs()  # one-signed row (asymmetric zero point at the edge)
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_arithmetic_equals_compressed_tensors(method, dtype):
    """Whole weights and the same weights in row blocks (as the merge streams them) give the oracle's bits."""
    scheme = SCHEMES[method]
    # (384, 128): one group a row, whose zero points pack as a single row
    for seed, (rows, cols) in enumerate([(256, 384), (200, 256), (130, 512), (384, 128)]):
        weight = _adversarial(rows, cols, dtype, seed)
        sibling = (weight[:64] * 3).contiguous()
        expected = compress({"w": weight, "s": sibling}, scheme.preset)["w"]
        shared = None
        if scheme.strategy == "tensor_group":
            shared = compressed_arithmetic.global_scale(
                torch.max(
                    compressed_arithmetic.absmax(weight, scheme),
                    compressed_arithmetic.absmax(sibling, scheme),
                )
            )
        step = scheme.block[0] if scheme.block else 8
        for rows_per_block in (rows, step):
            blocks = [
                compressed_arithmetic.quantize_rows(weight[i : i + rows_per_block], scheme, shared)
                for i in range(0, rows, rows_per_block)
            ]
            codes = torch.cat([b.codes for b in blocks])
            scales = torch.cat([b.scales for b in blocks])
            if scheme.kind == "int":
                got = {
                    "weight_packed": compressed_arithmetic.pack_int(codes, scheme.num_bits),
                    "weight_scale": scales,
                    "weight_shape": torch.tensor([rows, cols]),
                }
                if not scheme.symmetric:
                    zero_points = torch.cat([b.zero_points for b in blocks])
                    got["weight_zero_point"] = compressed_arithmetic.pack_zero_points(
                        zero_points, scheme.num_bits
                    )
            elif scheme.num_bits == 8:
                got = {"weight": codes, "weight_scale": scales}
            else:
                got = {"weight_packed": compressed_arithmetic.pack_fp4(codes), "weight_scale": scales}
                if shared is not None:
                    got["weight_global_scale"] = shared
            assert sorted(got) == sorted(expected), (method, sorted(expected))
            for key in expected:
                assert same_bits(got[key], expected[key]), (method, dtype, rows, rows_per_block, key)


@pytest.mark.parametrize("num_bits", [4, 8])
def test_integer_packing_equals_compressed_tensors(num_bits):
    """Whole words (the byte-view path) and ragged widths (compressed-tensors' zero padding), down the rows too."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    low, high = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1)
    generator = torch.Generator().manual_seed(num_bits)
    for rows, cols in [(16, 256), (1, 256), (5, 100), (9, 36), (3, 7)]:
        codes = torch.randint(low, high, (rows, cols), generator=generator, dtype=torch.int8)
        codes[0, :2] = torch.tensor([low, high - 1], dtype=torch.int8)
        assert same_bits(compressed_arithmetic.pack_int(codes, num_bits), pack_to_int32(codes, num_bits))
        expected = pack_to_int32(codes, num_bits, packed_dim=0)
        assert same_bits(compressed_arithmetic.pack_zero_points(codes, num_bits), expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QLoRA model (NF4, double quant) after a few steps, with its merged_16bit save."""
    root = tmp_path_factory.mktemp("compressed")
    base = save_random_model(tiny_llama_config(hidden_size=256, intermediate_size=384), root / "base", seed=3)
    tokenizer = build_tiny_tokenizer(base)
    model = attach_lora(load_4bit(base))
    train_steps(model, tokenizer, steps=2)
    merged = root / "merged_16bit"
    fastsave.save_pretrained_merged(model, merged, tokenizer)
    return {"model": model, "tokenizer": tokenizer, "merged": merged, "base": base, "root": root}


def _expected_from_merged(merged: dict[str, torch.Tensor], preset: str) -> dict[str, torch.Tensor]:
    expected: dict[str, torch.Tensor] = {}
    for layer in range(2):
        for parent, leaves in GROUPS:
            names = [f"model.layers.{layer}.{parent}.{leaf}" for leaf in leaves]
            for name, parts in compress({n: merged[f"{n}.weight"] for n in names}, preset).items():
                expected.update({f"{name}.{key}": value for key, value in parts.items()})
    return expected


@pytest.mark.parametrize("method", METHODS)
def test_save_equals_compressed_tensors_on_the_merged_checkpoint(trained, tmp_path, method, monkeypatch):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = SCHEMES[method]
    # blocks of 8 / 128 rows: the weights really stream through the quantizer in pieces
    monkeypatch.setattr(compressed_tensors, "ROW_BLOCK_BYTES", 1)
    out = tmp_path / method
    fastsave.save_pretrained_merged(trained["model"], out, trained["tokenizer"], save_method=method)

    merged = load_file(trained["merged"] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    expected = _expected_from_merged(merged, scheme.preset)
    quantized = {name for name in merged if name.endswith("_proj.weight")}
    assert len(quantized) == 14
    # everything else (embeddings, norms, lm_head) is the 16-bit merge, unchanged
    plain = {name: tensor for name, tensor in merged.items() if name not in quantized}
    assert set(got) == set(plain) | set(expected)
    for name, tensor in plain.items():
        assert same_bits(got[name], tensor), name
    for name, tensor in expected.items():
        assert same_bits(got[name], tensor), name
    if scheme.strategy == "tensor_group":  # fused siblings share one global scale, the others their own
        scales = {name: float(got[name]) for name in got if name.endswith("weight_global_scale")}
        prefix = "model.layers.0.self_attn."
        assert scales[prefix + "q_proj.weight_global_scale"] == scales[prefix + "v_proj.weight_global_scale"]

    # config.json: what compressed-tensors reads is the preset llm-compressor applies
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == scheme.quantization_config()
    parsed = QuantizationConfig.model_validate(config)
    group = parsed.config_groups["group_0"]
    preset = preset_name_to_scheme(scheme.preset, ["Linear"])
    # the preset, plus the observer llm-compressor sets for weights
    assert group.weights.observer == "memoryless_minmax"
    assert _without_observer(group.weights) == _without_observer(preset.weights)
    assert _without_observer(group.input_activations) == _without_observer(preset.input_activations)
    assert parsed.format == scheme.format and parsed.ignore == ["lm_head"]


def _without_observer(args) -> dict | None:
    # zp_dtype compared as a dtype, and only where there is a zero point: llm-compressor writes null
    # for a symmetric scheme, and compressed-tensors 0.20 leaves a default one out of its dump
    if args is None:
        return None
    fields = args.model_dump(exclude={"observer", "observer_kwargs", "zp_dtype"})
    return {**fields, "zp": None if args.symmetric else args.zp_dtype}


def _load(directory: Path, decompressed: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if decompressed else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits.float()


@pytest.mark.parametrize("method", METHODS)
def test_loads_back_decompressed_as_compressed_tensors_dequantizes(trained, tmp_path, method):
    from transformers import AutoModelForCausalLM

    scheme = SCHEMES[method]
    out = tmp_path / method
    fastsave.save_pretrained_merged(trained["model"], out, trained["tokenizer"], save_method=method)
    saved = load_file(out / "model.safetensors")

    from compressed_tensors.quantization import disable_quantization

    model = _load(out, decompressed=True)
    # transformers 5.17 (Unsloth's pin) decompresses the weights but keeps the scheme's activation
    # quantization in forward (FP8's dynamic input_activations); 5.25 loads the model dense. The
    # reference below quantizes nothing, so the comparison is of the weights alone either way.
    model.apply(disable_quantization)
    modules = dict(model.named_modules())
    reference = AutoModelForCausalLM.from_pretrained(trained["merged"], dtype=torch.bfloat16)
    for layer in range(2):
        for parent, leaves in GROUPS:
            for leaf in leaves:
                name = f"model.layers.{layer}.{parent}.{leaf}"
                state = {
                    key.removeprefix(name + "."): t for key, t in saved.items() if key.startswith(name + ".")
                }
                dequantized = decompress(state, scheme.preset).to(torch.bfloat16)
                assert same_bits(modules[name].weight.data, dequantized), name
                reference.get_submodule(name).weight.data.copy_(dequantized)
    logits = _logits(model)
    assert torch.equal(logits, _logits(reference))  # the dequantized weights are all that changed
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(trained["merged"], dtype=torch.bfloat16))
    gap = float((logits - merged_logits).norm() / merged_logits.norm())
    # random tiny weights are the hardest to quantize; a broken layout gives a gap of ~1 or more
    assert gap < 0.4, (method, gap)

    if method != "w4a16_asym":  # transformers' compressed load of it fails on the CPU (see README)
        compressed_logits = _logits(_load(out, decompressed=False))
        assert torch.isfinite(compressed_logits).all()
        assert float((compressed_logits - merged_logits).norm() / merged_logits.norm()) < 0.4


def test_group_size_refusal_names_the_layer_before_anything_is_written(tmp_path):
    base = save_random_model(
        tiny_llama_config(hidden_size=128, intermediate_size=320), tmp_path / "base", seed=5
    )
    tokenizer = build_tiny_tokenizer(base)
    model = attach_lora(load_4bit(base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.down_proj \(320 inputs\).*'fp8'"):
        fastsave.save_pretrained_merged(model, out, tokenizer, save_method="w4a16")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # per-channel FP8 and FP8 blocks (which pad 320 to 384 columns) take the same model
    for method in ("fp8", "fp8_block"):
        fastsave.save_pretrained_merged(model, tmp_path / method, tokenizer, save_method=method)
    blocks = load_file(tmp_path / "fp8_block" / "model.safetensors")
    assert blocks["model.layers.0.mlp.down_proj.weight_scale"].shape == (1, 3)


@pytest.mark.parametrize("method", ["fp8_static", "w8a8", "int8", "FP8-static"])
def test_calibrated_schemes_are_refused_saying_what_they_need(trained, tmp_path, method):
    with pytest.raises(ValueError, match="calibration data"):
        fastsave.save_pretrained_merged(
            trained["model"], tmp_path / "x", trained["tokenizer"], save_method=method
        )
    assert not (tmp_path / "x").exists()


def test_command_line_fp8_equals_quantizing_its_own_merged_16bit(trained, tmp_path):
    parser = argparse.ArgumentParser(prog="fastsave")
    add_merge_parser(parser.add_subparsers(dest="command"))
    adapter = tmp_path / "adapter"
    trained["model"].save_pretrained(str(adapter))

    def merge(*argv) -> int:
        args = parser.parse_args(["merge", *map(str, argv)])
        return args.func(args)

    assert merge(adapter, tmp_path / "m16", "--base", trained["base"]) == 0
    assert merge(adapter, tmp_path / "fp8", "--base", trained["base"], "--save-method", "fp8") == 0
    merged = load_file(tmp_path / "m16" / "model.safetensors")
    got = load_file(tmp_path / "fp8" / "model.safetensors")
    for name, tensor in _expected_from_merged(merged, "FP8_DYNAMIC").items():
        assert same_bits(got[name], tensor), name
    # the command line's NF4 round trip is the in-memory model's base: the same merge, file for file
    assert (tmp_path / "m16" / "model.safetensors").read_bytes() == (
        trained["merged"] / "model.safetensors"
    ).read_bytes()
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", str(adapter), str(tmp_path / "x"), "--save-method", "gptq"])
    assert merge(adapter, tmp_path / "static", "--base", trained["base"], "--save-method", "fp8_static") != 0
