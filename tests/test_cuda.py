"""On a CUDA GPU: the Triton kernels and the save's device path, held to bitsandbytes' CUDA kernels and peft.

CI has no GPU, so these are deselected by default (marker ``cuda``); on a GPU machine
``pytest -m cuda tests/test_cuda.py`` runs them (benchmarks/gpu_checks.sh does, with the GPU
benchmarks). Selected on a machine without CUDA they are skipped, saying so.

The oracles: bitsandbytes' own CUDA ``dequantize_4bit``; peft's ``get_delta_weight`` on the same
device (what the trained model computes); and the CPU fidelity oracle of tests/test_fidelity.py
(a float32 copy of the model, peft's ``merge_and_unload``, ``save_pretrained``).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _weights(rows: int, cols: int) -> torch.Tensor:
    """Random rows with the awkward ones in: a zero row, a tiny row, a huge row, exact ties of the codes."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols, device="cuda")
    w[0] = 0.0
    w[1] *= 1e-30
    w[2] *= 1e30
    w[3] = torch.tensor([-1.0, 1.0, 0.5, -0.5], device="cuda").repeat(cols // 4 + 1)[:cols]
    return w.to(torch.bfloat16)


# every blocksize for NF4 bf16 double quant; every quant type x nesting x output dtype at 64
DEQUANT_CASES = [("nf4", True, torch.bfloat16, bs) for bs in (64, 128, 256, 512, 1024, 2048, 4096)] + [
    (qt, nested, dtype, 64)
    for qt in ("nf4", "fp4")
    for nested in (True, False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    if (qt, nested, dtype) != ("nf4", True, torch.bfloat16)
]


@pytest.mark.parametrize("shape", [(256, 512), (96, 200)], ids=["rows-hold-blocks", "blocks-straddle-rows"])
@pytest.mark.parametrize(("quant_type", "nested", "dtype", "blocksize"), DEQUANT_CASES)
def test_dequantize_equals_bitsandbytes_cuda(shape, quant_type, nested, dtype, blocksize):
    import bitsandbytes.functional as F

    from fastsave import kernels

    codes, state = F.quantize_4bit(
        _weights(*shape), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    wanted = copy.copy(state)
    wanted.dtype = dtype
    ours = kernels.dequantize_4bit(codes, state, dtype=dtype)
    theirs = F.dequantize_4bit(codes, wanted)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.view(view), theirs.view(view)), int((ours.view(view) != theirs.view(view)).sum())


def _ordered(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(bits >= 0x8000, 0x8000 - bits, bits)


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_kernel_equals_the_float32_reference(rank, quant_type):
    """dequantize (float32) + (B @ A) * scaling, one rounding: against torch's float32 ops on the GPU."""
    import bitsandbytes.functional as F

    from fastsave import kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    codes, state = F.quantize_4bit(_weights(512, 1024), blocksize=64, quant_type=quant_type)
    a = torch.randn(rank, 1024, device="cuda") * 0.05
    b = torch.randn(512, rank, device="cuda") * 0.05
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    reference = (F.dequantize_4bit(codes, state32) + (b @ a) * 2.0).to(torch.bfloat16)
    ours = kernels.merge_lora_4bit(codes, state, a, b, 2.0, dtype=torch.bfloat16)
    distance = (_ordered(ours) - _ordered(reference)).abs()
    assert int(distance.max()) == 0, (
        f"{int((distance != 0).sum())} values differ, max {int(distance.max())} ulp"
    )


# ------------------------------------------------------------------------------------------------
# The save from a model on the GPU, against the fidelity oracle (CPU) and peft on the GPU


def _device_rows_spy(monkeypatch) -> list[int]:
    """Counts the kernel launches of the save's device-rows strategy."""
    from fastsave.merge import device_rows

    launches: list[int] = []
    real = device_rows._kernel

    def spy(*args, **kwargs):
        launches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(device_rows, "_kernel", spy)
    return launches


def _small_device_blocks(monkeypatch, nbytes: int) -> None:
    from fastsave import vram

    monkeypatch.setattr(vram, "DEVICE_BLOCK_BYTES", nbytes)
    monkeypatch.setattr(vram, "MIN_DEVICE_BLOCK_BYTES", nbytes)


def _same_device_reference_exact(model, out) -> int:
    """Every LoRA weight saved equals bnb's CUDA dequantize + peft's delta on the GPU, rounded once."""
    from checkpoint_files import saved_tensors
    from peft.tuners.lora import LoraLayer

    from fastsave.oracle import reference_merged_weight

    saved = saved_tensors(out)
    checked = 0
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and type(layer.get_base_layer()).__name__ == "Linear4bit":
            want = reference_merged_weight(layer).to(torch.bfloat16).cpu()
            got = saved[f"{name}.weight"]
            assert torch.equal(got, want), f"{name}: {int((got != want).sum())} values differ"
            checked += 1
    return checked


CASES = {
    "nf4 double quant": dict(),
    "fp4": dict(quant_type="fp4", double_quant=False),
    "nf4, rows cut in blocks of 4": dict(block_rows=4),
    "rslora": dict(lora=dict(r=4, alpha=32, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_16bit_from_the_gpu_is_exact(case, tmp_path, monkeypatch):
    from test_fidelity import _load, build_oracle, check_exact

    from fastsave.tiny import attach_lora, save_random_model, tiny_llama_config

    spec = dict(CASES[case])
    base = save_random_model(tiny_llama_config(), tmp_path / "base")
    if "block_rows" in spec:
        _small_device_blocks(monkeypatch, spec.pop("block_rows") * 64 * 2)  # rows of 64 bf16 columns
    lora = spec.pop("lora", {})
    model = attach_lora(_load(base, device_map="cuda", **spec), seed=3, **lora)
    launches = _device_rows_spy(monkeypatch)
    oracle = build_oracle(model, base)
    check_exact(model, base, tmp_path, f"cuda {case}", oracle=oracle, logits_from="oracle")
    assert launches, "the save did not use the kernels"
    assert _same_device_reference_exact(model, tmp_path / "out") == 14


def test_dora_and_embedding_merge_on_the_gpu(tmp_path):
    """DoRA and a LoRA on the 16-bit embedding are not the kernels' case: the whole-matrix merge on the GPU.

    Held to peft's merge_and_unload of the float32 oracle moved to the same GPU: DoRA's weight norm
    is a reduction, and the GPU sums it in another order than the CPU (the CPU oracle differs from
    both by a float32 ulp or so, 7.6e-6 at most here).
    """
    from checkpoint_files import saved_tensors
    from test_fidelity import _load, _merged_parameter, _perturb, build_oracle, fastsave_float32_merges

    import fastsave
    from fastsave.tiny import attach_lora, save_random_model, tiny_llama_config

    base = save_random_model(tiny_llama_config(), tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    model = attach_lora(_load(base, device_map="cuda"), use_dora=True, target_modules=targets)
    _perturb(model)
    oracle = build_oracle(model, base).to("cuda")
    ours32 = fastsave_float32_merges(model)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    saved = saved_tensors(tmp_path / "out")
    merged = oracle.merge_and_unload()
    assert len(ours32) == 2 * 3 + 1
    for name, weight in ours32.values():
        want = _merged_parameter(merged, name).detach().cpu()
        assert torch.equal(weight, want), f"{name}: float32 merge differs by {(weight - want).abs().max()}"
        assert torch.equal(saved[name], want.to(torch.bfloat16)), name


def test_lora_and_merged_4bit_from_the_gpu(tmp_path):
    """save_method='lora' writes peft's own files; merged_4bit reloads as quantizing the merged 16-bit weights."""
    import bitsandbytes.functional as F
    from checkpoint_files import saved_tensors
    from test_fidelity import _load, _lora_save_is_peft_own
    from transformers import AutoModelForCausalLM

    import fastsave
    from fastsave.tiny import attach_lora, save_random_model, tiny_llama_config

    base = save_random_model(tiny_llama_config(), tmp_path / "base")
    model = attach_lora(_load(base, device_map="cuda"), seed=5)
    _lora_save_is_peft_own(model, tmp_path)
    fastsave.save_pretrained_merged(model, tmp_path / "m16")
    fastsave.save_pretrained_merged(model, tmp_path / "m4", save_method="merged_4bit_forced")
    merged16 = saved_tensors(tmp_path / "m16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cuda")
    checked = 0
    for name, module in reloaded.named_modules():
        if type(module).__name__ == "Linear4bit":
            codes, _ = F.quantize_4bit(
                merged16[f"{name}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            assert torch.equal(module.weight.data.cpu(), codes), name
            checked += 1
    assert checked == 14
