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
    import fastsave.kernels as K
    import fastsave.lora_merge as lm
    from fastsave import quantized
    from fastsave.tiny import attach_lora, load_4bit, save_random_model, tiny_llama_config

    base = sys.argv[1]
    save_random_model(tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=1), base)
    model = attach_lora(load_4bit(base, quant_type=sys.argv[2]), r=8)
    lora = sorted(
        n.removeprefix("base_model.model.") + ".weight" for n, m in model.named_modules() if hasattr(m, "lora_A")
    )
    fastsave.save_pretrained_merged(model, base + "/reference")

    def forced(tensor):  # dispatch as for CUDA tensors
        return True

    quantized.use_kernels = forced
    lm.use_kernels = forced  # (row_blocks asks quantized.use_kernels, patched above)
    real, fused = K.merge_lora_4bit, []

    def counting(qweight, state, a, b, scaling, dtype=None):
        fused.append(tuple(state.shape))
        return real(qweight, state, a, b, scaling, dtype=dtype)

    K.merge_lora_4bit = counting
    fastsave.save_pretrained_merged(model, base + "/kernels")
    # What reaches the file is the kernel's result: a kernel returning 3.0 everywhere must show
    # in exactly the LoRA weights.
    K.merge_lora_4bit = lambda q, state, a, b, s, dtype=None: torch.full(tuple(state.shape), 3.0, dtype=dtype)
    fastsave.save_pretrained_merged(model, base + "/constant")
    ref, ker, const = (load_file(base + f"/{d}/model.safetensors") for d in ("reference", "kernels", "constant"))
    assert ref.keys() == ker.keys() == const.keys()
    print("RESULT" + json.dumps({
        "lora": lora,
        "fused": len(fused),
        "diff": [k for k in ref if not torch.equal(ref[k], ker[k])],
        "constant": sorted(k for k in const if bool((const[k] == 3.0).all())),
        "others_equal": all(torch.equal(const[k], ref[k]) for k in ref if k not in lora),
    }))
    """
)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forced_kernel_dispatch_matches_reference_path(tmp_path, quant_type):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FASTSAVE_REFERENCE_PATH", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "base"), quant_type],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    found = json.loads(line.removeprefix("RESULT"))
    assert len(found["lora"]) == 7, found  # q k v o gate up down of one layer
    assert found["fused"] == 7, found  # every LoRA linear went through the fused kernel, once
    assert found["diff"] == [], found  # r=8: the rank sum is exact, so bit-identical
    assert found["constant"] == found["lora"] and found["others_equal"], found  # its result is what is saved
