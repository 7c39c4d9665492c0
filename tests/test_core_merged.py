"""merged_16bit from a 4-bit QLoRA model: exactness against an independent float32 oracle, layout, reload."""

from __future__ import annotations

import copy
import json
import os
import stat

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from bnb_layouts import (
    is_repacked,
    linear4bit_layers,
    never_repack,
    repack_for_cpu,
    run_repacked_anywhere,
    simulate_cpu_without_avx512_bf16,
)
from checkpoint_files import saved_tensors
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import fastsave

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _small_blocks(monkeypatch, nbytes: int) -> None:
    """Row blocks of ``nbytes`` of float32 in the save (whatever the memory allowance)."""
    from fastsave.merge import assemble

    monkeypatch.setattr(assemble, "BLOCK_BYTES", nbytes)
    monkeypatch.setattr(assemble, "MIN_BLOCK_BYTES", nbytes)


def _lora_layers(model):
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
    }


def _oracle(layer, absmax_to_bf16: bool = False) -> torch.Tensor:
    """bitsandbytes' float32 dequantize + peft's own get_delta_weight, summed in float32."""
    base = layer.get_base_layer()
    state = copy.deepcopy(base.weight.quant_state)
    if absmax_to_bf16:  # what bitsandbytes' repacked CPU kernel multiplies by
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            state.absmax, state.nested = absmax.float(), False
        state.absmax = state.absmax.to(torch.bfloat16).float()
    state.dtype = torch.float32
    weight = bnb_functional.dequantize_4bit(base.weight.data.view(torch.uint8), state)
    for adapter in layer.active_adapters:
        weight = weight + layer.get_delta_weight(adapter).float()
    return weight


def _save_and_check_exact(model, out) -> dict[str, torch.Tensor]:
    """Save ``model`` merged into ``out``; every LoRA weight must equal the float32 oracle rounded
    once to bf16. Returns the saved tensors."""
    expected = {name + ".weight": _oracle(layer) for name, layer in _lora_layers(model).items()}
    fastsave.save_pretrained_merged(model, out)
    saved = saved_tensors(out)
    assert len(expected) == 14
    for name, reference in expected.items():
        assert saved[name].dtype == torch.bfloat16
        assert torch.equal(saved[name], reference.to(torch.bfloat16)), name
    return saved


@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
)
def test_merged_weights_are_bit_exact(qlora_model, tmp_path, quant_type, double_quant):
    _save_and_check_exact(qlora_model(quant_type=quant_type, double_quant=double_quant), tmp_path / "out")


def _state_bytes(layers) -> dict[str, tuple]:
    """Everything a 4-bit layer computes with: packed codes, absmax, layout flag."""
    state = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        qs = weight.quant_state
        state[name] = (
            weight.data.clone(),
            qs.absmax.clone(),
            qs.nested,
            qs.dtype,
            is_repacked(layer.get_base_layer()),
        )
    return state


def test_model_run_before_saving_merges_what_it_computes(qlora_model, tmp_path, monkeypatch):
    """A model that ran in inference mode on an AVX512-BF16 CPU holds bitsandbytes' repacked layout.
    The layout is produced with bitsandbytes' own conversion, so this runs on every CPU: the merge
    is what the repacked weights compute, and saving changes nothing."""
    model = qlora_model()
    layers = _lora_layers(model)
    expected = {name + ".weight": _oracle(layer, absmax_to_bf16=True) for name, layer in layers.items()}
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits  # bitsandbytes may repack here (AVX512-BF16) or not: either is fine
    repack_for_cpu(model)
    assert all(is_repacked(layer.get_base_layer()) for layer in layers.values())
    before = _state_bytes(layers)
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    saved = saved_tensors(out)
    for name, reference in expected.items():
        assert torch.equal(saved[name], reference.to(torch.bfloat16)), name
    after = _state_bytes(layers)
    for name in before:  # saving left the repacked layout exactly as it was
        assert all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(before[name], after[name], strict=True)
        ), name
    run_repacked_anywhere(monkeypatch)
    with torch.no_grad():
        repacked = model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (repacked.float() - trained.float()).abs().max() < 0.1  # the repacked model still computes
    assert (merged.float() - trained.float()).abs().max() < 0.1


def test_without_avx512_bf16_both_layouts_are_saved_exactly(tiny_base_dir, tmp_path, monkeypatch):
    """On a CPU without AVX512-BF16 (simulated: bitsandbytes' capability check says False) a forward in
    inference mode does not repack; the repacked layout made by bitsandbytes' conversion still saves
    exactly. Proves the tests above do not depend on this machine's CPU."""
    from fastsave.tiny import attach_lora, load_4bit

    simulate_cpu_without_avx512_bf16(monkeypatch)
    model = attach_lora(load_4bit(tiny_base_dir))
    assert not any(m.support_avx512bf16_for_cpu for m in linear4bit_layers(model))
    layers = _lora_layers(model)
    plain = {name + ".weight": _oracle(layer) for name, layer in layers.items()}
    bf16_absmax = {name + ".weight": _oracle(layer, absmax_to_bf16=True) for name, layer in layers.items()}
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9]]))
    assert not any(is_repacked(m) for m in linear4bit_layers(model)), "repacked without AVX512-BF16"
    fastsave.save_pretrained_merged(model, tmp_path / "plain")
    saved = saved_tensors(tmp_path / "plain")
    assert all(torch.equal(saved[n], w.to(torch.bfloat16)) for n, w in plain.items())
    repack_for_cpu(model)
    fastsave.save_pretrained_merged(model, tmp_path / "repacked")
    saved = saved_tensors(tmp_path / "repacked")
    assert all(torch.equal(saved[n], w.to(torch.bfloat16)) for n, w in bf16_absmax.items())
    # the bf16 absmax of the repacked layout really changes some bits: the two cases differ
    assert any(not torch.equal(plain[n].to(torch.bfloat16), bf16_absmax[n].to(torch.bfloat16)) for n in plain)


def test_reload_with_plain_transformers_matches_logits(qlora_model, tiny_tokenizer, tmp_path):
    model = qlora_model()
    model.eval()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.dtype == torch.bfloat16
    batch = tiny_tokenizer(
        ["the quick brown fox jumps", "saving must be exact"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        trained = model(**batch).logits.float()
        merged = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    assert (trained - merged).abs()[mask].max() < 0.1
    assert (trained.argmax(-1) == merged.argmax(-1))[mask].float().mean() > 0.9


def test_names_config_and_files(qlora_model, tiny_tokenizer, tiny_base_dir, tmp_path):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer)
    saved = saved_tensors(out)
    with safe_open(tiny_base_dir / "model.safetensors", framework="pt") as handle:
        base_names = set(handle.keys())
    assert set(saved) == base_names
    for name in saved:
        assert "lora_" not in name and "base_layer" not in name and "absmax" not in name
        assert "quant" not in name and not name.startswith("base_model")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert not list(tmp_path.glob(".fastsave-staging-*")), "staging directory left behind"


def test_file_modes_follow_umask(qlora_model, tmp_path):
    old = os.umask(0o022)
    try:
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out")
    finally:
        os.umask(old)
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_small_shards_and_index(qlora_model, tmp_path):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    saved = saved_tensors(out)
    assert set(index["weight_map"]) == set(saved)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    for shard in shards:
        with safe_open(out / shard, framework="pt") as handle:
            assert set(handle.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
        size = sum(
            saved[k].numel() * saved[k].element_size() for k, v in index["weight_map"].items() if v == shard
        )
        tensors_in_shard = [k for k, v in index["weight_map"].items() if v == shard]
        assert size <= 100_000 or len(tensors_in_shard) == 1
    AutoModelForCausalLM.from_pretrained(out)  # transformers follows the index


def test_float16_output_and_existing_directory(qlora_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    (out / "model-00001-of-00009.safetensors").write_text("stale shard of an earlier save")
    fastsave.save_pretrained_merged(qlora_model(), out, dtype=torch.float16)
    assert (out / "README.md").read_text() == "keep me"
    assert not (out / "model-00001-of-00009.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in saved_tensors(out).values())


def test_model_still_trains_and_runs_after_saving(qlora_model, tmp_path):
    model = qlora_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert not hasattr(model, "merged") or all(not getattr(m, "merged", False) for m in model.modules())


def test_error_midway_leaves_nothing(qlora_model, tmp_path, monkeypatch):
    from fastsave.io import shards as writer

    model = qlora_model()
    original = writer.ShardWriter.write_piece
    calls = {"n": 0}

    def failing_write(self, piece, release=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a save
        return original(self, piece, release)

    monkeypatch.setattr(writer.ShardWriter, "write_piece", failing_write)
    with pytest.raises(KeyboardInterrupt):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".fastsave-*"))


def test_temporary_location_is_used_and_removed(qlora_model, tmp_path, monkeypatch):
    from fastsave.pipeline import run

    seen = []
    real = run.write_merged_weights

    def spy(plan, directory, options, *team):
        seen.append(directory)
        return real(plan, directory, options, *team)

    monkeypatch.setattr(run, "write_merged_weights", spy)
    scratch = tmp_path / "scratch"
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", temporary_location=scratch)
    assert seen and seen[0].parent == scratch
    assert not scratch.exists()  # the save created it, so the save removed it
    assert (tmp_path / "out" / "model.safetensors").exists()
    scratch.mkdir()
    (scratch / "keep").write_text("the user's")
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", temporary_location=scratch)
    assert [p.name for p in scratch.iterdir()] == ["keep"]


def test_minimal_memory_budget_still_saves(qlora_model, tmp_path):
    model = qlora_model()
    expected = {name + ".weight": _oracle(layer) for name, layer in _lora_layers(model).items()}
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, maximum_memory_usage=1e-6)
    saved = saved_tensors(out)
    for name, reference in expected.items():
        assert torch.equal(saved[name], reference.to(torch.bfloat16))


@pytest.mark.parametrize(("blocksize", "nested"), [(64, True), (128, False), (256, True)])
def test_blocks_straddling_rows_decode_like_bitsandbytes_reference(blocksize, nested):
    """Rows of 96 values: quantization blocks straddle rows, which bnb's native CPU kernel mishandles."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from fastsave.sources import quantized_weight_source

    torch.manual_seed(blocksize)
    layer = bnb.nn.Linear4bit(96, 40, bias=False, quant_type="nf4", compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(40, 96),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type="nf4",
    )
    layer._apply(lambda t: t)  # Params4bit quantizes on the first move to a device
    layer.weight = layer.weight.to("cpu")
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute(
        layer.weight.data.reshape(-1), absmax.float(), state.code, blocksize, state.shape, torch.float32
    )
    assert torch.equal(quantized_weight_source(layer).float32(), reference)


@pytest.mark.parametrize("state", ["as-trained", "ran-not-repacked", "cpu-repacked"])
def test_row_blocks_give_the_same_bits_as_the_whole_matrix(qlora_model, tmp_path, monkeypatch, state):
    """Blocks of 32 rows (many per weight) against the whole-matrix oracle, plain and repacked 4-bit;
    each layout made deterministically (bitsandbytes' conversion, or its repack switched off)."""
    from fastsave.merge import row_blocks

    model = qlora_model()
    layers = _lora_layers(model)
    repacked = state == "cpu-repacked"
    expected = {name + ".weight": _oracle(layer, absmax_to_bf16=repacked) for name, layer in layers.items()}
    if state == "ran-not-repacked":
        never_repack(model)
        model.eval()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    elif repacked:
        repack_for_cpu(model)
    assert all(is_repacked(m) == repacked for m in linear4bit_layers(model))
    _small_blocks(monkeypatch, 4 * 64 * 32)  # 32 rows of 64 float32 columns
    used = []
    real, real_fused = row_blocks.merged_rows, row_blocks.stream_fused_rows

    def spy(merge):
        used.append(merge.name)
        return real(merge)

    def spy_fused(plan, dtype):  # the one-pass C merge of the same row blocks (fastsave.merge.fused_rows)
        used.append(plan.name)
        return real_fused(plan, dtype)

    monkeypatch.setattr(row_blocks, "merged_rows", spy)
    monkeypatch.setattr(row_blocks, "stream_fused_rows", spy_fused)
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    # every LoRA linear went through the row blocks (and the 4-bit weights without LoRA too)
    assert {name + ".weight" for name in layers} <= set(used), used
    saved = saved_tensors(out)
    for name, reference in expected.items():
        assert torch.equal(saved[name], reference.to(torch.bfloat16)), name


def test_lora_on_embed_tokens_merges_in_row_blocks(qlora_model, tmp_path, monkeypatch):
    """An embedding's LoRA delta (B @ A).T goes through the row blocks too (its rows are columns of the
    product, checked against the whole product), with peft's own bits."""
    from fastsave.merge import row_blocks

    model = qlora_model(target_modules=["q_proj", "embed_tokens"])
    layer = model.base_model.model.model.embed_tokens
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    _small_blocks(monkeypatch, 4 * 64 * 32)  # 32 rows a block: 10 blocks of the embedding
    used = []
    real = row_blocks.merged_rows
    monkeypatch.setattr(row_blocks, "merged_rows", lambda merge: used.append(merge.name) or real(merge))
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert "model.embed_tokens.weight" in used
    saved = saved_tensors(tmp_path / "out")
    assert torch.equal(saved["model.embed_tokens.weight"], expected.to(torch.bfloat16))


class _QuantizerWithoutLoadOperations:
    """A transformers quantizer as releases before ``get_load_operations`` (5.17, Unsloth's pin) have
    it: its loading operations are only in the conversions it adds. Records that they were read."""

    def __init__(self, quantizer) -> None:
        self._quantizer = quantizer
        self.conversions_read = 0

    def __getattr__(self, name: str):
        if name == "get_load_operations":
            raise AttributeError(name)
        return getattr(self._quantizer, name)

    def get_weight_conversions(self):
        self.conversions_read += 1
        return self._quantizer.get_weight_conversions()


@pytest.mark.parametrize(
    ("double_quant", "quantizer_api"),
    [(True, "load_operations"), (False, "load_operations"), (True, "weight_conversions_only")],
)
def test_model_loaded_from_a_prequantized_4bit_checkpoint(
    tiny_base_dir, tmp_path, double_quant, quantizer_api
):
    """transformers records the quantizer's (irreversible) deserialization on such a model; the merge
    must still write the dequantized weights under their own names, with no quantization_config.
    Both ways transformers exposes the quantizer's loading operations are exercised."""
    from fastsave.tiny import attach_lora, load_4bit

    quantized = tmp_path / "q4"
    load_4bit(tiny_base_dir, double_quant=double_quant).save_pretrained(quantized)
    reloaded = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu")
    if getattr(reloaded, "_weight_conversions", None) is not None:  # transformers 5: conversions recorded
        assert reloaded.hf_quantizer.get_weight_conversions(), "the quantizer adds its deserialization"
    if quantizer_api == "weight_conversions_only":
        reloaded.hf_quantizer = _QuantizerWithoutLoadOperations(reloaded.hf_quantizer)
    model = attach_lora(reloaded, seed=3)
    out = tmp_path / "out"
    saved = _save_and_check_exact(model, out)
    assert not any(key.endswith(("absmax", "quant_map", "quant_state.bitsandbytes__nf4")) for key in saved)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out)  # transformers loads it as a plain model
    if (
        quantizer_api == "weight_conversions_only"
        and getattr(reloaded, "_weight_conversions", None) is not None
    ):
        assert reloaded.hf_quantizer.conversions_read > 0

    out4 = tmp_path / "out4"
    fastsave.save_pretrained_merged(model, out4, save_method="merged_4bit_forced")
    assert json.loads((out4 / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    AutoModelForCausalLM.from_pretrained(out4, device_map="cpu")


def test_larger_write_buffers_paid_from_the_allowance_write_the_exact_checkpoint(
    qlora_model, tmp_path, monkeypatch
):
    """A large save's write buffers (larger than the smallest, what they hold beyond it taken from
    the pieces allowed in flight), produced here for a small model by scaling the rule down: the
    weights still equal the float32 oracle and every shard verifies with its checksums."""
    from fastsave.io import direct_file
    from fastsave.io.verify import verify_checkpoint
    from fastsave.pipeline import write

    # the test model's 0.23 MB of output gets 4 buffers of 64 KiB instead of 16 KiB
    monkeypatch.setattr(direct_file, "BUFFER_BYTES", 16 * 1024)
    monkeypatch.setattr(direct_file, "BUFFERS_PER_OUTPUT", 2)
    chosen = []

    def spying(allowance, minimal, output_bytes=0):
        chosen.append(direct_file.write_buffers(allowance, minimal, output_bytes))
        return chosen[-1]

    monkeypatch.setattr(write, "write_buffers", spying)
    _save_and_check_exact(qlora_model(), tmp_path / "out")
    (each, depth, paid), *_ = chosen
    assert each == 64 * 1024 and paid == (each - 16 * 1024) * depth > 0
    report = verify_checkpoint(tmp_path / "out", checksums=True)
    assert report.ok and report.digests_checked >= 1, report.summary()


def test_merged_blocks_placed_for_the_writer_are_written_from_their_memory_exactly(
    qlora_model, tmp_path, monkeypatch
):
    """The merged row blocks are allocated at the phase of their file offset and written without a
    copy into the write buffers (fastsave.io.placement; the test model's blocks are small, so the
    smallest length written that way is lowered to 4 KiB): every write the save makes is one that
    O_DIRECT takes (told it took, whatever the filesystem under the test), bytes did go out from
    the blocks' memory, every LoRA weight equals the float32 oracle and every shard verifies."""
    from patch_sites import aligned_direct_writes

    from fastsave.io import direct_file
    from fastsave.io.verify import verify_checkpoint

    monkeypatch.setattr(direct_file, "IN_PLACE_MIN", direct_file.ALIGN)
    written, in_place = aligned_direct_writes(monkeypatch)
    _save_and_check_exact(qlora_model(), tmp_path / "out")
    assert in_place and in_place[0] > 0 and written
    report = verify_checkpoint(tmp_path / "out", checksums=True)
    assert report.ok and report.digests_checked >= 1, report.summary()
