"""Plan-scaling probe: how long planning and the plan's checks take for models with very many tensors.

    python benchmarks/plan_scaling.py                        # every probe at its default sizes
    python benchmarks/plan_scaling.py --probes check --sizes 20000,100000 --timeout 1200
    python benchmarks/plan_scaling.py --probes deepseek --experts 256,576 --json plan.json

A DeepSeek-V3 checkpoint holds ~92k tensors (half of them fp8 scales); the target (issue 11) is a
100k-tensor plan planned and checked in under 5 s. Nothing here allocates weights: every model is
on the meta device. Each measurement runs in a fresh process with a timeout (the checks of today
grow quadratically); for a run cut off by the timeout the table gives a lower bound and the
extrapolation from the two largest sizes that finished.

Probes:

  check     fastsave.plan.check_plan alone on a synthetic plan of N tensors (names shaped like a
            per-expert MoE checkpoint's, half of them merged LoRA weights with their census)
  walk      fastsave.plan.build_plan (the walk + check_plan) on a meta model holding N LoRA-wrapped
            linears laid out per expert (layers.L.mlp.experts.E.{gate,up,down}_proj), as models
            that keep one module per expert hold them; the LoRA layers are peft's own lora.Linear,
            attached directly (get_peft_model's injection is itself superlinear: its time for the
            same model is reported as "peft" where it was measured)
  deepseek  transformers' DeepseekV3ForCausalLM on meta (DeepSeek-V3's dimensions, 61 layers,
            --experts routed experts, fused expert tensors as transformers 5 holds them), LoRA on
            every linear and on the expert stacks (target_parameters), then build_plan,
            to_checkpoint_names (which splits the stacks into per-expert checkpoint tensors) and
            check_plan's name checks on the resulting checkpoint plan
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import RESULT_MARK, emit_result, markdown_table

DEFAULT_SIZES = {"check": [5000, 10000, 20000, 100000], "walk": [1000, 2000, 4000, 8000, 20000, 100000]}

# DeepSeek-V3's dimensions (config.json of deepseek-ai/DeepSeek-V3), written out: nothing is downloaded
DEEPSEEK_V3 = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    tie_word_embeddings=False,
)


def _expert_name(index: int, experts: int) -> tuple[int, int, str]:
    layer, rest = divmod(index, 3 * experts)
    expert, which = divmod(rest, 3)
    return layer, expert, ("gate_proj", "up_proj", "down_proj")[which]


# ----------------------------------------------------------------------------- probes (child side)


def probe_check(count: int) -> dict[str, Any]:
    """check_plan on a synthetic plan of ``count`` tensors, half of them merged LoRA weights."""
    import torch

    from fastsave.plan.checks import check_plan
    from fastsave.plan.items import Plan, PlanItem

    experts = 256
    items, census = [], []
    for index in range(count):
        layer, expert, proj = _expert_name(index // 2, experts)
        module = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
        if index % 2 == 0:
            items.append(PlanItem(f"{module}.weight", (16, 16), torch.bfloat16, lambda: None, module))
            census.append(module)
        else:  # a tensor beside it that is not merged (a per-expert scale, say)
            items.append(PlanItem(f"{module}.weight_scale", (1,), torch.bfloat16, lambda: None))
    plan = Plan(items, torch.bfloat16, census)
    started = time.perf_counter()
    check_plan(plan)
    return {"tensors": count, "check_plan_seconds": time.perf_counter() - started}


class _MetaResolver:
    """Planning only: a meta tensor stands for itself (nothing is produced in these probes)."""

    def resolve(self, name, module, entry, merged):

        from fastsave.sources.dense import DenseSource

        return entry if entry.source is not None else entry.with_source(DenseSource(entry.tensor))


def _plan_on_meta(model):
    """fastsave's one plan walk over a model on the meta device, LoRA factors on meta too."""
    from unittest import mock

    import torch

    from fastsave.adapters import live_peft
    from fastsave.plan.walk import unwrap_peft, walk_model

    root = unwrap_peft(model)
    tied: set[int] = set()  # found by the census pass, as fastsave's live-model input does
    census = live_peft.lora_module_census(root, None, tied)
    # the factors are on the meta device here: let the walk take them as they are
    with mock.patch.object(live_peft, "offloaded_value", lambda module, attr: getattr(module, attr)):
        return walk_model(root, _MetaResolver(), torch.bfloat16, None, census, tied=tied)


def _per_expert_model(count: int):
    """A meta model with ``count`` LoRA-wrapped linears, one module per expert, peft's lora.Linear."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear
    from torch import nn

    experts = 256
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"])
    layers = nn.ModuleList()
    with torch.device("meta"):
        for index in range(count):
            layer, expert, proj = _expert_name(index, experts)
            while len(layers) <= layer:
                block = nn.Module()
                block.mlp = nn.Module()
                block.mlp.experts = nn.ModuleList()
                layers.append(block)
            expert_list = layers[layer].mlp.experts
            while len(expert_list) <= expert:
                expert_list.append(nn.Module())
            shape = (2048, 7168) if proj == "down_proj" else (7168, 2048)
            base = nn.Linear(*shape, bias=False)
            setattr(
                expert_list[expert], proj, LoraLinear(base, "default", config=config, r=16, lora_alpha=32)
            )
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = layers
    return root


def probe_walk(count: int) -> dict[str, Any]:
    """The plan walk + check_plan on a meta model with ``count`` LoRA-wrapped linears."""
    from fastsave.plan.checks import check_plan

    started = time.perf_counter()
    model = _per_expert_model(count)
    built = time.perf_counter() - started
    started = time.perf_counter()
    plan = _plan_on_meta(model)
    plan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    check_plan(plan)
    return {
        "tensors": len(plan.items),
        "lora_modules": len(plan.merged_modules),
        "model_seconds": built,
        "build_plan_seconds": plan_seconds,
        "check_plan_seconds": time.perf_counter() - started,
    }


def probe_deepseek(experts: int, layers: int) -> dict[str, Any]:
    """DeepSeek-V3 on meta with LoRA everywhere: build_plan, to_checkpoint_names, check of the names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from fastsave.plan.checks import check_plan, check_unique_names
    from fastsave.plan.layout import to_checkpoint_layout
    from fastsave.plan.walk import unwrap_peft

    config = DeepseekV3Config(**{**DEEPSEEK_V3, "n_routed_experts": experts, "num_hidden_layers": layers})
    result: dict[str, Any] = {"experts": experts, "layers": layers}
    started = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result["model_seconds"] = time.perf_counter() - started
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        # peft 0.21 maps gate/up/down_proj of this model type onto the fused expert stacks, so the
        # dense and shared-expert MLPs stay without LoRA; the plan's size does not depend on it
        target_modules=[
            *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            *("gate_proj", "up_proj", "down_proj"),
        ],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    started = time.perf_counter()
    model = get_peft_model(model, lora)
    result["peft_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    plan = _plan_on_meta(model)
    check_plan(plan)
    result["build_plan_seconds"] = time.perf_counter() - started
    result["planned_in_memory"] = len(plan.items)
    result["lora_modules"] = len(plan.merged_modules)
    started = time.perf_counter()
    checkpoint = to_checkpoint_layout(unwrap_peft(model), plan)
    result["to_checkpoint_names_seconds"] = time.perf_counter() - started
    result["tensors"] = len(checkpoint.items)
    # the checkpoint plan's names (its LoRA census was checked on the in-memory plan above)
    started = time.perf_counter()
    check_unique_names(checkpoint)
    result["check_plan_seconds"] = time.perf_counter() - started
    return result


PROBES = {"check": probe_check, "walk": probe_walk, "deepseek": probe_deepseek}


# ----------------------------------------------------------------------------- parent side


def run_probe(kind: str, arguments: list[int], timeout: float) -> dict[str, Any]:
    """One probe in a fresh process (cwd: a temporary directory, never the repo root)."""
    command = [sys.executable, __file__, "--child", kind, *map(str, arguments)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"outcome": "timeout", "seconds": time.perf_counter() - started}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        return {"outcome": "failed", "error": proc.stderr[-1500:]}
    return {"outcome": "ok", **json.loads(lines[-1][len(RESULT_MARK) :])}


def _extrapolate(points: list[tuple[int, float]], target: int) -> tuple[float, float] | None:
    """(exponent, seconds at ``target``) from the two largest measured sizes, as a power law."""
    if len(points) < 2:
        return None
    (n1, t1), (n2, t2) = points[-2], points[-1]
    if t1 <= 0 or t2 <= 0 or n1 == n2:
        return None
    exponent = math.log(t2 / t1) / math.log(n2 / n1)
    return exponent, t2 * (target / n2) ** exponent


def main() -> None:
    """Run the probes and print a table per probe."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        emit_result(PROBES[sys.argv[2]](*map(int, sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", default="check,walk,deepseek")
    parser.add_argument("--sizes", default=None, help="tensor counts for check/walk (default per probe)")
    parser.add_argument(
        "--experts", default="256,576", help="deepseek: routed experts, comma list (DeepSeek-V3: 256)"
    )
    parser.add_argument("--layers", type=int, default=61, help="deepseek: decoder layers (DeepSeek-V3: 61)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds per measurement; a size extrapolated past it is not run (default 900)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for kind in [p.strip() for p in args.probes.split(",") if p.strip()]:
        if kind == "deepseek":
            report[kind] = [
                run_probe(kind, [int(experts), args.layers], args.timeout)
                for experts in args.experts.split(",")
            ]
            rows = [
                [
                    str(r.get("experts", "-")),
                    str(r.get("tensors", "-")),
                    *(
                        f"{r[key]:.2f}" if key in r else r["outcome"]
                        for key in (
                            "peft_seconds",
                            "build_plan_seconds",
                            "to_checkpoint_names_seconds",
                            "check_plan_seconds",
                        )
                    ),
                ]
                for r in report[kind]
            ]
            print(f"\ndeepseek-v3 on meta ({args.layers} layers):\n")
            header = ["routed experts", "checkpoint tensors", "get_peft_model s", "build_plan s"]
            print(markdown_table([*header, "to_checkpoint_names s", "check_plan (names) s"], rows))
            continue
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES[kind]
        key = "build_plan_seconds" if kind == "walk" else "check_plan_seconds"
        results: list[dict[str, Any]] = []
        for size in sizes:
            points = [(r["tensors"], r[key]) for r in results if r["outcome"] == "ok"]
            fit = _extrapolate(points, size)
            if any(r["outcome"] == "timeout" for r in results) or (fit and fit[1] > args.timeout):
                # it would run past the timeout: say how long it would take instead of waiting for it
                results.append({"outcome": "skipped", "tensors": size})
                continue
            result = run_probe(kind, [size], args.timeout)
            result.setdefault("tensors", size)
            results.append(result)
            print(f"{kind} {size}: {result}", flush=True)
        report[kind] = results
        points = [(r["tensors"], r[key]) for r in results if r["outcome"] == "ok"]
        rows = []
        for r in results:
            if r["outcome"] == "ok":
                cells = [f"{r[key]:.2f}", f"{r['check_plan_seconds']:.2f}"]
            elif r["outcome"] == "timeout":
                cells = [f"> {args.timeout:.0f} (timeout)", "-"]
            elif r["outcome"] == "skipped":
                cells = [f"not run (over {args.timeout:.0f})", "-"]
            else:
                cells = [r["outcome"], "-"]
            fit = _extrapolate([p for p in points if p[0] < r["tensors"]], r["tensors"])
            estimate = "-" if r["outcome"] == "ok" or fit is None else f"~{fit[1]:.0f} (n^{fit[0]:.1f})"
            rows.append([str(r["tensors"]), *cells, estimate])
        print(f"\n{kind}:\n")
        print(
            markdown_table(["tensors", key.replace("_", " "), "check_plan alone s", "extrapolated s"], rows)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
