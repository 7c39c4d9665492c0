"""``fastsave merge``: a saved adapter plus a 16-bit base on disk, merged without a 4-bit model.

The key cross-check: the command line's default ("dequantized": quantize to NF4 and back as each
base tensor streams past) equals, file for file, the in-memory ``save_pretrained_merged`` of the
4-bit model the adapter was trained on, when that model was loaded 4-bit on the CPU from the same
base with the same settings (bitsandbytes' CPU quantization is deterministic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from checkpoint_files import saved_tensors
from safetensors.torch import load_file

import fastsave
from fastsave.cli.merge import add_merge_parser, run_merge
from fastsave.sources import nf4_native, quantized_weight_source
from fastsave.sources.nf4_roundtrip import quantized_module_names
from fastsave.tiny import (
    attach_lora,
    build_tiny_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
    train_steps,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastsave")
    add_merge_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["merge", *map(str, argv)])


def _merge(argv: list[str]) -> int:
    args = _parse(argv)
    assert args.func is run_merge
    return args.func(args)


def _same_files(a: Path, b: Path, pattern: str) -> None:
    names_a = sorted(p.name for p in a.glob(pattern))
    assert names_a == sorted(p.name for p in b.glob(pattern))
    assert names_a, f"no {pattern} in {a}"
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    untied = save_random_model(tiny_llama_config(), root / "base", seed=1)
    tied = save_random_model(tiny_llama_config(tie_word_embeddings=True), root / "tied", seed=2)
    tokenizer = build_tiny_tokenizer(untied)
    build_tiny_tokenizer(tied)
    return {"base": untied, "tied": tied, "tokenizer": tokenizer}


def _trained_adapter(base: Path, tokenizer, out: Path, load_kwargs=None, steps: int = 2, **lora_kwargs):
    model = attach_lora(load_4bit(base, **(load_kwargs or {})), **lora_kwargs)
    train_steps(model, tokenizer, steps=steps)
    model.save_pretrained(str(out))
    return model


CASES = {
    # all linears, a few real training steps, several shards
    "all-linear": dict(lora={}, load={}, flags=["--max-shard-size", "60KB"], mem={"max_shard_size": "60KB"}),
    # only q/v: the other linears were 4-bit too and must be quantized-dequantized as well;
    # modules_to_save, rank/alpha patterns and DoRA
    "qv-dora-patterns-mts": dict(
        lora=dict(
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            use_dora=True,
            rank_pattern={"layers.1.self_attn.q_proj": 4},
            alpha_pattern={"v_proj": 8},
        ),
        load={},
        flags=[],
        mem={},
    ),
    "rslora": dict(
        lora=dict(target_modules=["o_proj", "down_proj"], use_rslora=True), load={}, flags=[], mem={}
    ),
    # FP4 without double quantization, both in training and on the command line
    "fp4-no-double-quant": dict(
        lora={},
        load=dict(quant_type="fp4", double_quant=False),
        flags=["--quant-type", "fp4", "--no-double-quant"],
        mem={},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dequantized_merge_equals_in_memory_save_bit_for_bit(bases, tmp_path, case):
    spec = CASES[case]
    adapter = tmp_path / "adapter"
    model = _trained_adapter(bases["base"], bases["tokenizer"], adapter, spec["load"], **spec["lora"])
    fastsave.save_pretrained_merged(model, tmp_path / "memory", bases["tokenizer"], **spec["mem"])

    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"], *spec["flags"]]) == 0

    # byte-identical shards (same names, order, header and data) and index
    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    if case == "all-linear":  # sharded: both wrote the same index
        _same_files(tmp_path / "memory", tmp_path / "cli", "*.index.json")
    else:  # one shard: neither wrote an index
        assert not [*(tmp_path / "memory").glob("*.index.json"), *(tmp_path / "cli").glob("*.index.json")]
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == config
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "cli" / name).is_file(), name


@pytest.mark.parametrize("round_trip", ["torch", "bitsandbytes"])
def test_dequantized_merge_without_the_compiled_round_trip_is_the_same(
    bases, tmp_path, monkeypatch, round_trip
):
    """Where the C round trip cannot run (no compiler, FASTSAVE_NATIVE=0), the torch one runs; where
    that gives other bits than bitsandbytes, bitsandbytes' own: the same files either way."""
    from fastsave.sources import nf4_fused, nf4_native

    adapter = tmp_path / "adapter"
    model = _trained_adapter(
        bases["base"], bases["tokenizer"], adapter, {}, target_modules=["q_proj", "up_proj"]
    )
    fastsave.save_pretrained_merged(model, tmp_path / "memory", bases["tokenizer"])
    monkeypatch.setattr(nf4_native, "available", lambda: False)
    if round_trip == "bitsandbytes":
        monkeypatch.setattr(nf4_fused, "fused_matches_bitsandbytes", lambda *args: False)
    nf4_fused.chosen_round_trip.cache_clear()
    nf4_fused.compiled_matches_bitsandbytes.cache_clear()
    used = []
    real = nf4_fused.chosen_round_trip
    monkeypatch.setattr(nf4_fused, "chosen_round_trip", lambda *args: used.append(real(*args)) or used[-1])
    try:
        assert _merge([adapter, tmp_path / "cli", "--base", bases["base"]]) == 0
    finally:
        monkeypatch.undo()
        nf4_fused.chosen_round_trip.cache_clear()
        nf4_fused.compiled_matches_bitsandbytes.cache_clear()
    expected = nf4_fused.fused_round_trip if round_trip == "torch" else nf4_fused.bitsandbytes_round_trip
    assert used and all(chosen is expected for chosen in used)
    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")


def test_tied_embeddings_with_lora_on_embed_tokens(bases, tmp_path):
    adapter = tmp_path / "adapter"
    model = _trained_adapter(
        bases["tied"], bases["tokenizer"], adapter, target_modules=["embed_tokens", "q_proj", "down_proj"]
    )
    fastsave.save_pretrained_merged(model, tmp_path / "memory", bases["tokenizer"])
    assert _merge([adapter, tmp_path / "cli", "--base", bases["tied"]]) == 0

    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    weights = saved_tensors(tmp_path / "cli")
    assert "lm_head.weight" in weights  # the adapter changed embed_tokens: both written, untied
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_embeddings_untouched_are_written_once(bases, tmp_path):
    adapter = tmp_path / "adapter"
    _trained_adapter(bases["tied"], bases["tokenizer"], adapter, steps=0)
    assert _merge([adapter, tmp_path / "cli", "--base", bases["tied"]]) == 0
    weights = saved_tensors(tmp_path / "cli")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["tie_word_embeddings"] is True


def test_original_base_equals_peft_merge_and_unload(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, target_modules="all-linear", use_rslora=True)
    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"], "--base-weights", "original"]) == 0

    base = AutoModelForCausalLM.from_pretrained(str(bases["base"]), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    weights = saved_tensors(tmp_path / "cli")
    assert set(weights) <= set(reference)
    for name, tensor in weights.items():
        # peft adds the delta to the float32 base exactly as fastsave does: one rounding, bit for bit
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_original_differs_from_dequantized(bases, tmp_path):
    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0, target_modules=["q_proj"])
    assert _merge([adapter, tmp_path / "deq", "--base", bases["base"]]) == 0
    assert _merge([adapter, tmp_path / "orig", "--base", bases["base"], "--base-weights", "original"]) == 0
    deq, orig = saved_tensors(tmp_path / "deq"), saved_tensors(tmp_path / "orig")
    base = load_file(str(bases["base"] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"  # no LoRA: original keeps it, dequantized rounds it to NF4
    assert torch.equal(orig[name], base[name]) and not torch.equal(deq[name], base[name])
    assert torch.equal(deq["model.norm.weight"], base["model.norm.weight"])
    assert torch.equal(deq["lm_head.weight"], base["lm_head.weight"])  # a 4-bit load keeps lm_head 16-bit


def test_merged_4bit_forced_from_the_command_line(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter)
    assert _merge([adapter, tmp_path / "m16", "--base", bases["base"]]) == 0
    with pytest.warns(UserWarning, match="re-quantizes"):
        assert (
            _merge([adapter, tmp_path / "m4", "--base", bases["base"], "--save-method", "merged_4bit_forced"])
            == 0
        )
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cpu")
    expected = load_4bit(tmp_path / "m16")
    modules = dict(expected.named_modules())
    count = 0
    for name, module in reloaded.named_modules():
        if type(module).__name__ == "Linear4bit":
            assert torch.equal(module.weight.data, modules[name].weight.data), name
            ours, theirs = quantized_weight_source(module), quantized_weight_source(modules[name])
            assert torch.equal(ours.float32(), theirs.float32()), name
            count += 1
    assert count == 14


def test_lora_save_method_copies_the_adapter(bases, tmp_path):
    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    assert _merge([adapter, tmp_path / "out", "--save-method", "lora"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (adapter / name).read_bytes()


def test_base_found_through_adapter_config_and_hf_cache(bases, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    config = json.loads((adapter / "adapter_config.json").read_text())

    # base_model_name_or_path as a local directory
    config["base_model_name_or_path"] = str(bases["base"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert _merge([adapter, tmp_path / "local"]) == 0

    # base_model_name_or_path as a repo id that only the local cache holds (never downloaded)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-base" / "snapshots" / commit
    shutil.copytree(bases["base"], snapshot)
    (cache / "models--tiny-org--tiny-base" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-base" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config["base_model_name_or_path"] = "tiny-org/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert _merge([adapter, tmp_path / "cached"]) == 0
    _same_files(tmp_path / "local", tmp_path / "cached", "*.safetensors")


def test_quantized_modules_follow_transformers(bases):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(bases["base"])))
    names = quantized_module_names(model)
    assert "lm_head" not in names and len(names) == 14
    loaded = load_4bit(bases["base"])
    assert names == {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"}


# --------------------------------------------------------------------------- errors


def test_missing_adapter_dir(tmp_path, capsys):
    assert _merge([tmp_path / "nope", tmp_path / "out"]) == 1
    assert "adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_directory_without_adapter(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _merge([tmp_path / "empty", tmp_path / "out"]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


def test_missing_base(bases, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert _merge([adapter, tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert "--base" in err and "never downloads" in err
    assert _merge([adapter, tmp_path / "out", "--base", tmp_path / "also-gone"]) == 1
    assert "also-gone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".fastsave-staging*"))


def test_quantized_base_is_refused(bases, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    fake = tmp_path / "bnb-4bit"
    shutil.copytree(bases["base"], fake)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (fake / "config.json").write_text(json.dumps(config))
    assert _merge([adapter, tmp_path / "out", "--base", fake]) == 1
    assert "not the 16-bit base" in capsys.readouterr().err


def test_unknown_flag_and_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse([tmp_path, tmp_path / "out", "--frobnicate"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([tmp_path, tmp_path / "out", "--save-method", "merged_4bit"])
    with pytest.raises(SystemExit):
        _parse([tmp_path, tmp_path / "out", "--blocksize", "100"])
    assert _merge([tmp_path, tmp_path / "out", "--max-shard-size", "lots"]) == 1
    assert "max_shard_size" in capsys.readouterr().err


def test_gpt2_conv1d_layout(tmp_path):
    """Conv1D weights are stored (in, out) and quantized transposed by transformers: all four paths agree."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    base = save_random_model(config, tmp_path / "gpt2", seed=6)
    model = attach_lora(load_4bit(base), target_modules=["c_attn", "c_proj", "c_fc"])
    model.save_pretrained(str(tmp_path / "adapter"))
    fastsave.save_pretrained_merged(model, tmp_path / "memory")
    fastsave.save_pretrained_merged(model, tmp_path / "memory-original", base_weights="original")
    assert _merge([tmp_path / "adapter", tmp_path / "cli", "--base", base]) == 0
    assert (
        _merge(
            [tmp_path / "adapter", tmp_path / "cli-original", "--base", base, "--base-weights", "original"]
        )
        == 0
    )

    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    _same_files(tmp_path / "memory-original", tmp_path / "cli-original", "*.safetensors")
    weights = saved_tensors(tmp_path / "cli-original")
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(tmp_path / "adapter")
    ).merge_and_unload()
    reference = reference.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def _tiny_mixtral(directory: Path, seed: int) -> Path:
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return save_random_model(config, directory, seed=seed)


def test_lora_on_expert_parameters_is_left_to_the_training_session(tmp_path, capsys):
    base = _tiny_mixtral(tmp_path / "mixtral", seed=8)
    model = attach_lora(
        load_4bit(base), target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]
    )
    model.save_pretrained(str(tmp_path / "adapter"))
    assert _merge([tmp_path / "adapter", tmp_path / "cli", "--base", base]) == 1
    assert "target_parameters" in (err := capsys.readouterr().err) and "save_pretrained_merged" in err
    assert not (tmp_path / "cli").exists()


def test_moe_checkpoint_layout(tmp_path):
    """Mixtral: transformers renames and fuses the experts while loading. The command line copies them
    from the checkpoint as they are, the in-memory save splits them back: all four paths agree, under
    the base checkpoint's names, and the original-base merge equals peft's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _tiny_mixtral(tmp_path / "mixtral", seed=7)
    model = attach_lora(load_4bit(base), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.save_pretrained(str(tmp_path / "adapter"))
    fastsave.save_pretrained_merged(model, tmp_path / "memory")
    fastsave.save_pretrained_merged(model, tmp_path / "memory-original", base_weights="original")
    assert _merge([tmp_path / "adapter", tmp_path / "cli", "--base", base]) == 0
    original = [tmp_path / "adapter", tmp_path / "cli-original", "--base", base, "--base-weights", "original"]
    assert _merge(original) == 0

    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    _same_files(tmp_path / "memory-original", tmp_path / "cli-original", "*.safetensors")
    weights = saved_tensors(tmp_path / "cli-original")
    assert set(weights) == set(saved_tensors(base))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in weights
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(tmp_path / "adapter")
    ).merge_and_unload()
    reference.save_pretrained(tmp_path / "reference")  # transformers writes the checkpoint layout
    expected = saved_tensors(tmp_path / "reference")
    assert set(expected) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_dequantized_merge_against_bitsandbytes_and_peft(bases, tmp_path):
    """The command line's default, against an oracle built without fastsave: each weight a 4-bit load
    quantizes goes through bitsandbytes' quantize_4bit + float32 dequantize (QLoRA defaults), peft's
    own get_delta_weight of the adapter (on a float32 model) is added, one rounding to bfloat16."""
    import bitsandbytes.functional as bnb_functional
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    _trained_adapter(
        bases["base"],
        bases["tokenizer"],
        adapter,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
    )
    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"]]) == 0
    saved = saved_tensors(tmp_path / "cli")
    base = load_file(str(bases["base"] / "model.safetensors"))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bases["base"]), dtype=torch.float32), str(adapter)
    )
    lora = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in peft_model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")
    }
    assert len(lora) == 6
    linears = {
        n + ".weight"
        for n, m in peft_model.get_base_model().named_modules()
        if type(m).__name__ in ("Linear", "Linear4bit")
    }
    quantized = {n for n in linears if not n.startswith("lm_head")} | set(lora)
    assert set(saved) == set(base)
    for name, tensor in base.items():
        expected = tensor.float()
        if name in quantized:
            codes, state = bnb_functional.quantize_4bit(
                tensor, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
            )
            state.dtype = torch.float32
            expected = bnb_functional.dequantize_4bit(codes, state)
        if name in lora:
            expected = expected + lora[name].get_delta_weight("default").float()
        assert torch.equal(saved[name], expected.to(torch.bfloat16)), name


def test_lora_on_the_router_parameter(tmp_path):
    """peft wraps Mixtral's router weight as a bare parameter (ParamWrapper): the command line merges it
    like the in-memory save, byte for byte (the experts, fused only in memory, are copied as stored)."""
    base = _tiny_mixtral(tmp_path / "mixtral", seed=9)
    model = attach_lora(load_4bit(base), target_modules=["q_proj"], target_parameters=["mlp.gate.weight"])
    assert any(type(m).__name__ == "ParamWrapper" for m in model.modules())
    model.save_pretrained(str(tmp_path / "adapter"))
    fastsave.save_pretrained_merged(model, tmp_path / "memory")
    assert _merge([tmp_path / "adapter", tmp_path / "cli", "--base", base]) == 0
    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    name = "model.layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(
        saved_tensors(tmp_path / "cli")[name], saved_tensors(base)[name]
    )  # the delta is in


@pytest.mark.parametrize("base_weights", ["dequantized", "original"])
def test_command_line_merges_in_row_blocks(bases, tmp_path, monkeypatch, base_weights):
    """The command line uses the in-memory save's dispatcher: every 4-bit-loaded weight, LoRA or not,
    is produced in row blocks read from disk, never as a whole float32 matrix."""
    from fastsave.merge import dispatch, row_blocks

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    blocks, fused, whole = [], [], []
    real_blocks, real_fused, real_whole = (
        row_blocks.merged_rows,
        row_blocks.stream_fused_rows,
        dispatch.merge_whole,
    )
    monkeypatch.setattr(
        row_blocks, "merged_rows", lambda merge: blocks.append(merge.name) or real_blocks(merge)
    )
    # the round trip with the merge in one pass (fastsave.merge.fused_rows): the same row blocks
    monkeypatch.setattr(
        row_blocks,
        "stream_fused_rows",
        lambda plan, dtype: fused.append(plan.name) or real_fused(plan, dtype),
    )
    monkeypatch.setattr(dispatch, "merge_whole", lambda s, d: whole.append(s) or real_whole(s, d))
    assert _merge([adapter, tmp_path / "out", "--base", bases["base"], "--base-weights", base_weights]) == 0
    assert len(blocks) + len(fused) == 14 and not whole, (blocks, fused, whole)
    # the C pass serves the round trip and the original 16-bit rows alike (a C compiler is here)
    assert len(fused) == (14 if nf4_native.available() else 0)


def test_tensors_copied_from_the_base_stream_from_its_pages(bases, tmp_path, monkeypatch):
    """The embedding and the lm_head, which the merge copies as they are, go to the writer as rows
    of the base file's mapped pages a few at a time, never read whole into fresh memory (at
    Qwen2.5-0.5B's shape that was 272 MB); the output holds the base's values."""
    from fastsave.merge import dispatch
    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    adapter = tmp_path / "adapter"
    _trained_adapter(bases["base"], bases["tokenizer"], adapter, steps=0)
    read_whole, real_get = [], SafetensorsCheckpoint.get
    monkeypatch.setattr(
        SafetensorsCheckpoint, "get", lambda self, name: read_whole.append(name) or real_get(self, name)
    )
    monkeypatch.setattr(dispatch, "COPY_CHUNK_BYTES", 4096)  # several pieces from the tiny embedding
    assert _merge([adapter, tmp_path / "out", "--base", bases["base"]]) == 0
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(read_whole), read_whole
    got, base = saved_tensors(tmp_path / "out"), saved_tensors(bases["base"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name], base[name]), name


def _perturbed(model, seed: int = 4):
    """Every trained tensor moved; not AdaLoRA's ranknum, which peft does not save (it is the rank)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point() and ".ranknum." not in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
    return model


@pytest.mark.parametrize("tuner", ["IA3", "VeRA", "AdaLoRA", "OFT", "TrainableTokens"])
def test_other_tuners_from_the_command_line(bases, tmp_path, tuner):
    """An adapter of another tuner, trained on the 4-bit model: the command line's merge equals the
    in-memory save of that model, file for file."""
    from peft import get_peft_model
    from test_tuners import tuner_config

    model = _perturbed(get_peft_model(load_4bit(bases["base"]), tuner_config(tuner)))
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    fastsave.save_pretrained_merged(model, tmp_path / "memory", bases["tokenizer"])
    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"]]) == 0
    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")


def test_loha_into_the_original_base_equals_peft(bases, tmp_path):
    """LoHa (trained on a 16-bit model; peft builds it wrongly over 4-bit weights) into the original
    base equals peft's merge_and_unload on the float32 base, rounded once."""
    from peft import LoHaConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bases["base"]), dtype=torch.bfloat16)
    model = _perturbed(get_peft_model(model, LoHaConfig(target_modules=["q_proj", "down_proj"])))
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"], "--base-weights", "original"]) == 0

    base = AutoModelForCausalLM.from_pretrained(str(bases["base"]), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for name, tensor in saved_tensors(tmp_path / "cli").items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("how", ["trainable tokens", "modules_to_save"])
def test_adapter_of_a_resized_vocabulary(bases, tmp_path, how):
    """Chat tokens added and the embeddings resized before training: peft saves the resized
    embeddings with the adapter, and the command line merges into a model of that size, equal to
    the in-memory save, with the new tokens in the tokenizer it writes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bases["base"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = load_4bit(bases["base"])
    model.resize_token_embeddings(len(tokenizer))
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    if how == "trainable tokens":
        extra = dict(trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids})
    else:
        extra = dict(modules_to_save=["embed_tokens", "lm_head"])
    model = _perturbed(attach_lora(model, target_modules=["q_proj", "v_proj"], **extra))
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    fastsave.save_pretrained_merged(model, tmp_path / "memory", tokenizer)
    assert _merge([adapter, tmp_path / "cli", "--base", bases["base"]]) == 0

    _same_files(tmp_path / "memory", tmp_path / "cli", "*.safetensors")
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 322
    written = AutoTokenizer.from_pretrained(tmp_path / "cli")
    assert written.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == new_ids
