"""fastsave.sources.sharded on 2 CPU ranks (gloo): FSDP2, FSDP1 (with and without use_orig_params),
bitsandbytes 4-bit under FSDP, and DeepSpeed ZeRO-3.

The oracle is the unsharded model itself: each rank builds the same model (same seed) once more
without wrapping it, and every module gathered from the sharded model must equal (torch.equal,
same name) that model's state dict; the walk must list the unsharded model's modules in its order.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from distributed_harness import qlora_for_sharding, run_ranks, tiny_peft, values, zero3_engine

from fastsave.errors import ShardingError
from fastsave.sources.sharded import ShardedModel, clean_name, detect_sharding

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def _walk_order(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bit equality: torch.equal alone calls two NaNs unequal, and packed 4-bit bytes stored as
    # bf16 (bnb_4bit_quant_storage) contain NaN patterns
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _compare(sharded: ShardedModel, reference: torch.nn.Module) -> dict:
    """Gather every module, one at a time, and compare with the unsharded reference."""
    expected = reference.state_dict()
    sharded.check_walk()
    seen: dict[str, bool] = {}
    for entry in sharded.entries():
        with sharded.gathered(entry) as tensors:
            assert list(tensors) == [entry.full_name(p) for p in entry.parameters]
            for name, tensor in tensors.items():
                seen[name] = _same_bits(tensor, expected[name])
    with sharded.gathered(sharded.subtree(Q_PROJ)) as lora:
        lora_names = sorted(lora)
        lora_equal = all(_same_bits(t, expected[n]) for n, t in lora.items())
    return {
        "kind": sharded.kind,
        "unequal": sorted(n for n, ok in seen.items() if not ok),
        # bitsandbytes writes a 4-bit weight's quant_state as extra keys under the weight's name
        # (weight.absmax, weight.quant_map, ...): they travel as the gathered weight's quant_state
        "missing": sorted(
            k for k in set(expected) - set(seen) if k.rpartition(".weight.")[0] + ".weight" not in seen
        ),
        "extra": sorted(set(seen) - set(expected)),
        "order": [e.name for e in sharded.entries()] == _walk_order(reference),
        "shapes": all(
            tuple(expected[e.full_name(p)].shape) == s
            for e in sharded.entries()
            for p, s in zip(e.parameters, e.shapes, strict=True)
        ),
        "lora_names": lora_names,
        "lora_equal": lora_equal,
        "lora_layers": len(sharded.lora_layers()),
    }


def _materialized(model: torch.nn.Module, sharded: ShardedModel, reference: torch.nn.Module) -> dict:
    """Inside materialized(), peft's own code on the live layer sees whole tensors; after it, shards."""
    layer, ref_layer = model.get_submodule(Q_PROJ), reference.get_submodule(Q_PROJ)
    before = [type(p) for p in layer.parameters()]
    with sharded.materialized(sharded.subtree(Q_PROJ)):
        delta_equal = torch.equal(layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"))
        base_equal = _same_bits(layer.base_layer.weight.data, ref_layer.base_layer.weight.data)
        base_type = type(layer.base_layer.weight).__name__
    return {
        "delta_equal": delta_equal,
        "base_equal": base_equal,
        "base_type": base_type,
        "restored": [type(p) for p in layer.parameters()] == before,
    }


def _rows_report(sharded: ShardedModel, reference: torch.nn.Module) -> dict:
    """gathered_rows against slices of the unsharded parameter, windows across the rank boundary."""
    from torch.distributed.fsdp import fully_shard

    embed = "base_model.model.model.embed_tokens"
    full = reference.get_submodule(embed).weight
    results = {}
    for start, stop in [(0, 0), (0, 320), (150, 170), (10, 20), (300, 320), (160, 161)]:
        with sharded.gathered_rows(sharded.entry(embed), "weight", start, stop) as rows:
            results[(start, stop)] = _same_bits(rows, full[start:stop])
    # 7 rows on 2 ranks: chunks of 4 and 3 (uneven)
    torch.manual_seed(1)
    odd, odd_reference = torch.nn.Linear(5, 7), None
    odd_reference = odd.weight.detach().clone()
    fully_shard(odd)
    odd_sharded = ShardedModel(odd)
    for start in range(8):
        for stop in range(start, 8):
            with odd_sharded.gathered_rows(odd_sharded.entry(""), "weight", start, stop) as rows:
                results[("odd", start, stop)] = _same_bits(rows, odd_reference[start:stop])
    try:
        with sharded.gathered_rows(sharded.entry(embed), "weight", 10, 400):
            pass
    except ValueError as exc:
        results["out of range"] = "outside" in str(exc)
    return {"rows_wrong": sorted(str(k) for k, ok in results.items() if not ok), "rows_checked": len(results)}


def _fsdp2_worker(rank: int, world: int) -> list[dict]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference = tiny_peft()
    model = tiny_peft()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = ShardedModel(model)
    reports = [
        _compare(sharded, reference)
        | _materialized(model, sharded, reference)
        | _rows_report(sharded, reference)
    ]
    # after a forward FSDP2 leaves the root unsharded; gathering must still work (and reshard it)
    with torch.no_grad():  # the model still computes what the unsharded one does
        logits_equal = torch.equal(
            model(input_ids=torch.arange(8)[None]).logits, reference(input_ids=torch.arange(8)[None]).logits
        )
    reports.append(_compare(ShardedModel(model), reference))
    reports[-1]["logits_equal"] = logits_equal
    reports[-1]["still_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    return reports


def _fsdp1_worker(rank: int, world: int) -> list[dict]:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    reference = tiny_peft()
    reports = []
    for use_orig_params in (False, True):
        model = tiny_peft()
        # peft's policy puts the float32 LoRA leaves in units of their own: FSDP1 flattens one
        # dtype per unit (the bf16 base and the fp32 adapters cannot share one).
        wrapped = FSDP(
            model,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            use_orig_params=use_orig_params,
            device_id=torch.device("cpu"),  # FSDP1 refuses CPU unless told
        )
        with torch.no_grad():
            wrapped(input_ids=torch.arange(8)[None])
        sharded = ShardedModel(wrapped)
        report = _compare(sharded, reference) | _materialized(model, sharded, reference)
        # one decoder layer held: its modules gathered one by one inside, without re-summoning
        expected = reference.state_dict()
        layer = sharded.subtree("base_model.model.model.layers.1")
        held_equal = []
        with sharded.holding(layer):
            for entry in layer:
                with sharded.gathered(entry) as tensors:
                    held_equal += [_same_bits(t, expected[n]) for n, t in tensors.items()]
        report["held_equal"] = len(held_equal) == 9 + 14 and all(held_equal)
        reports.append(report)
    return reports


def _check(report: dict) -> None:
    assert report["unequal"] == [] and report["missing"] == [] and report["extra"] == [], report
    assert report["order"] and report["shapes"]
    assert report["lora_names"] == [
        f"{Q_PROJ}.base_layer.weight",
        f"{Q_PROJ}.lora_A.default.weight",
        f"{Q_PROJ}.lora_B.default.weight",
    ]
    assert report["lora_equal"]
    assert report["lora_layers"] == 14  # 7 linears x 2 layers, all-linear
    if "delta_equal" in report:
        assert report["delta_equal"] and report["base_equal"] and report["restored"], report


def test_fsdp2_gathers_each_module_equal_to_the_unsharded_model():
    reports = values(run_ranks(_fsdp2_worker))
    for rank_reports in reports:
        for report in rank_reports:
            assert report["kind"] == "fsdp2"
            _check(report)
        assert rank_reports[-1]["still_sharded"] and rank_reports[-1]["logits_equal"]
        assert rank_reports[0]["base_type"] == "Parameter"
        assert rank_reports[0]["rows_wrong"] == [] and rank_reports[0]["rows_checked"] == 6 + 36 + 1


def test_fsdp1_gathers_each_module_equal_to_the_unsharded_model():
    reports = values(run_ranks(_fsdp1_worker))
    for rank_reports in reports:
        assert len(rank_reports) == 2  # use_orig_params False and True
        for report in rank_reports:
            assert report["kind"] == "fsdp1"
            _check(report)
            assert report["held_equal"]


def _bnb_worker(rank: int, world: int, base_dir: str) -> list[dict]:
    import bitsandbytes.functional as F
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    reference = qlora_for_sharding(base_dir)
    ref_linear = reference.get_submodule(f"{Q_PROJ}.base_layer")
    ref_weight = F.dequantize_4bit(ref_linear.weight.data, ref_linear.weight.quant_state)
    reports = []
    for engine in ("fsdp2", "fsdp1"):
        model = qlora_for_sharding(base_dir)
        if engine == "fsdp2":
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            model = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))
        sharded = ShardedModel(model)
        report = _compare(sharded, reference) | _materialized(model, sharded, reference)
        with sharded.gathered(sharded.entry(f"{Q_PROJ}.base_layer")) as tensors:
            packed = tensors[f"{Q_PROJ}.base_layer.weight"]
            report["packed_equal"] = torch.equal(
                packed.view(torch.uint8), ref_linear.weight.data.view(torch.uint8)
            )
            report["dequantized_equal"] = torch.equal(
                F.dequantize_4bit(packed, packed.quant_state), ref_weight
            )
            copy = packed.clone()
        # What an eval-mode forward does on a CPU with AVX512-BF16 (hazard 1), with bitsandbytes'
        # own conversion so it happens on every machine: the transient full weight is repacked and
        # the module's quant_state rewritten in place, while the shards keep the original layout.
        F._convert_weight_packed_for_cpu(copy, model.get_submodule(f"{Q_PROJ}.base_layer").quant_state)
        try:
            with sharded.gathered(sharded.entry(f"{Q_PROJ}.base_layer")):
                report["repacked"] = "not refused"
        except ShardingError as exc:
            report["repacked"] = str(exc)
        reports.append(report)
    return reports


def test_bnb_4bit_under_fsdp_gathers_the_packed_weight_and_its_quant_state(tiny_base_dir):
    reports = values(run_ranks(_bnb_worker, str(tiny_base_dir)))
    for rank_reports in reports:
        assert [r["kind"] for r in rank_reports] == ["fsdp2", "fsdp1"]
        for report in rank_reports:
            _check(report)
            assert report["packed_equal"] and report["dequantized_equal"]
            assert report["base_type"] == "Params4bit"
            assert report["repacked"].startswith(f"{Q_PROJ}.base_layer.weight: bitsandbytes repacked")


def _zero3_worker(rank: int, world: int, base_dir: str) -> list[dict]:
    import bitsandbytes.functional as F

    reports = []
    # a bf16 base, and a bitsandbytes 4-bit base stored as bf16 (what ZeRO-3 QLoRA uses)
    for make in (tiny_peft, lambda: qlora_for_sharding(base_dir)):
        reference, model = make(), make()
        engine = zero3_engine(model)
        sharded = ShardedModel(engine)  # the engine is unwrapped to its .module
        report = _compare(sharded, reference) | _materialized(engine.module, sharded, reference)
        report["partitioned"] = all(p.numel() == 0 for p in engine.module.parameters())
        ref_linear = reference.get_submodule(f"{Q_PROJ}.base_layer")
        with sharded.gathered(sharded.entry(f"{Q_PROJ}.base_layer")) as tensors:
            weight = tensors[f"{Q_PROJ}.base_layer.weight"]
            report["dequantized_equal"] = getattr(
                ref_linear.weight, "quant_state", None
            ) is None or torch.equal(
                F.dequantize_4bit(weight, weight.quant_state),
                F.dequantize_4bit(ref_linear.weight.data, ref_linear.weight.quant_state),
            )
        reports.append(report)
    return reports


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero3_gathers_each_module_equal_to_the_unsharded_model(tiny_base_dir):
    reports = values(run_ranks(_zero3_worker, str(tiny_base_dir), join_timeout_s=300))
    for rank_reports in reports:
        assert [r["base_type"] for r in rank_reports] == ["Parameter", "Params4bit"]
        for report in rank_reports:
            assert report["kind"] == "zero3"
            assert report["partitioned"] and report["dequantized_equal"]
            _check(report)


def test_an_unsharded_model_is_read_in_place_without_a_process_group():
    model = tiny_peft()
    sharded = ShardedModel(model)
    assert sharded.kind == "none"
    report = _compare(sharded, model)
    _check(report)
    with sharded.gathered(sharded.entry(f"{Q_PROJ}.base_layer")) as tensors:
        assert tensors[f"{Q_PROJ}.base_layer.weight"] is model.get_submodule(f"{Q_PROJ}.base_layer").weight


def test_wrapper_segments_are_removed_from_names():
    assert (
        clean_name("_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module.mlp")
        == "base_model.model.model.layers.0.mlp"
    )
    assert clean_name("_orig_mod.model.layers.1._checkpoint_wrapped_module.self_attn") == (
        "model.layers.1.self_attn"
    )
    assert clean_name("") == ""


def test_detect_sharding_reads_zero3_marks():
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert detect_sharding(model) == "none"
    # ZeRO-3 marks each parameter it partitions with ds_id and ds_status (ZeRO-1/2 do not)
    for parameter in model[1].parameters():
        parameter.ds_id, parameter.ds_status, parameter.ds_shape = 0, "NOT_AVAILABLE", parameter.shape
    assert detect_sharding(model) == "zero3"
