"""The merge loop's CUDA dispatch to fastsave.kernels, exercised on CPU under TRITON_INTERPRET=1.

No GPU is needed: a fresh interpreter with the Triton interpreter on runs a whole save with the
dispatch forced on (as it is for CUDA tensors) and compares it with the torch reference path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file
    import fastsave
    from fastsave import kernels
    from fastsave.merge import device_rows
    from fastsave.tiny import attach_lora, load_4bit, save_random_model, tiny_llama_config

    base = sys.argv[1]
    save_random_model(tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=1), base)
    model = attach_lora(load_4bit(base, quant_type=sys.argv[2]), r=8)
    lora = sorted(
        n.removeprefix("base_model.model.") + ".weight" for n, m in model.named_modules() if hasattr(m, "lora_A")
    )
    fastsave.save_pretrained_merged(model, base + "/reference")
    calls = []
    real = kernels.merge_lora_4bit
    def counted(*args, **kwargs):  # the real fused kernel, counted
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    kernels.merge_lora_4bit = counted
    device_rows.kernels_serve = lambda tensor: True  # the dispatch a CUDA tensor gets
    fastsave.save_pretrained_merged(model, base + "/kernels")
    # What reaches the file is the kernel's result: a kernel returning 3.0 everywhere must show
    # in exactly the LoRA weights.
    kernels.merge_lora_4bit = lambda q, state, a, b, s, dtype=None: torch.full(tuple(state.shape), 3.0, dtype=dtype)
    fastsave.save_pretrained_merged(model, base + "/constant")
    ref, ker, const = (load_file(base + f"/{d}/model.safetensors") for d in ("reference", "kernels", "constant"))
    assert ref.keys() == ker.keys() == const.keys()
    print("CALLS", len(calls), "DIFF", [k for k in ref if not torch.equal(ref[k], ker[k])])
    print("RESULT" + json.dumps({
        "lora": lora,
        "constant": sorted(k for k in const if bool((const[k] == 3.0).all())),
        "others_equal": all(torch.equal(const[k], ref[k]) for k in ref if k not in lora),
    }))
    """
)


def _interpreted(script: str, tmp_path, argument: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with Triton's CPU interpreter on from the start; it must succeed."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FASTSAVE_REFERENCE_PATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "base"), argument],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forced_kernel_dispatch_matches_reference_path(tmp_path, quant_type):
    result = _interpreted(SCRIPT, tmp_path, quant_type)
    line = next(line for line in result.stdout.splitlines() if line.startswith("CALLS"))
    calls = int(line.split()[1])
    assert calls == 7, line  # each of the layer's seven LoRA linears went through the fused kernel once
    assert line.endswith("DIFF []"), line  # r=8: the rank sum is exact, so bit-identical
    found = json.loads(
        next(x for x in result.stdout.splitlines() if x.startswith("RESULT")).removeprefix("RESULT")
    )
    assert len(found["lora"]) == 7, found
    assert found["constant"] == found["lora"] and found["others_equal"], found  # its result is what is saved


BLOCKS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file
    import fastsave
    from fastsave import kernels, vram
    from fastsave.merge import device_rows
    from fastsave.tiny import attach_lora, load_4bit, save_random_model, tiny_llama_config

    base, double_quant = sys.argv[1], sys.argv[2] == "nested"
    config = tiny_llama_config(hidden_size=128, intermediate_size=512, num_hidden_layers=1, vocab_size=256)
    save_random_model(config, base)
    model = attach_lora(load_4bit(base, double_quant=double_quant), r=8, target_modules=["down_proj", "q_proj"])
    fastsave.save_pretrained_merged(model, base + "/reference")

    # the dispatch a CUDA tensor gets, and a GPU whose free memory allows 64 KiB blocks
    device_rows.kernels_serve = lambda tensor: True
    free = {}
    def small_gpu(device):
        free[str(device)] = 6 * 64 * 1024 * 4 // 3
        return free[str(device)]
    vram.free_device_memory = small_gpu
    launches = []
    for name in ("merge_lora_4bit", "dequantize_4bit"):
        real = getattr(kernels, name)
        def counted(codes, state, *args, _real=real, _name=name, **kwargs):
            out = _real(codes, state, *args, **kwargs)
            launches.append([_name, list(state.shape), out.numel() * out.element_size()])
            return out
        setattr(kernels, name, counted)
    fastsave.save_pretrained_merged(model, base + "/blocks", maximum_memory_usage=0.75)
    ref, got = (load_file(base + f"/{d}/model.safetensors") for d in ("reference", "blocks"))
    assert ref.keys() == got.keys()
    print("RESULT" + json.dumps({
        "diff": [k for k in ref if not torch.equal(ref[k], got[k])],
        "launches": launches,
        "asked": sorted(free),
    }))
    """
)


@pytest.mark.parametrize("double_quant", ["nested", "plain"])
def test_device_row_blocks_follow_the_vram_allowance_and_give_the_reference_bits(tmp_path, double_quant):
    """Weights cut into row blocks sized from the free VRAM (faked: there is no GPU here) come out
    bit-identical to the torch reference path, for merged (one LoRA delta) and plain 4-bit weights."""
    result = _interpreted(BLOCKS_SCRIPT, tmp_path, double_quant)
    found = json.loads(
        next(x for x in result.stdout.splitlines() if x.startswith("RESULT")).removeprefix("RESULT")
    )
    assert found["diff"] == [], found["diff"]
    launches = found["launches"]
    # 64 KiB of bf16 output per block: 6 blocks of the allowance, 3/4 of the "free" memory
    assert all(nbytes <= 64 * 1024 for _, _, nbytes in launches), launches
    down = [shape for name, shape, _ in launches if name == "merge_lora_4bit" and shape[1] == 512]
    assert [rows for rows, _ in down] == [64, 64], down  # 128 rows of 512 bf16 values in two blocks
    # gate_proj and up_proj (512 x 128, no LoRA): dequantized alone, in blocks of 256 rows
    plain = [shape for name, shape, _ in launches if name == "dequantize_4bit" and shape == [256, 128]]
    assert len(plain) == 4, launches
    assert found["asked"] == ["cpu"], found["asked"]
