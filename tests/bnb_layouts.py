"""Put 4-bit weights into the layout a test needs, the same on every x86-64 CPU.

bitsandbytes 0.50 repacks a Linear4bit weight for its CPU kernel the first time the layer runs in
inference mode (eval, no grad) -- but only where the CPU has AVX512-BF16:
``Linear4bit.__init__`` stores ``has_avx512bf16()`` in ``support_avx512bf16_for_cpu`` and
``Linear4bit.forward`` calls ``functional._convert_weight_packed_for_cpu`` when it is set. A test
that relies on the forward to repack (or not) passes on one machine and fails on another. So:

- :func:`repack_for_cpu` produces the repacked layout with bitsandbytes' own conversion function,
  exactly the call its forward makes, on any CPU;
- :func:`never_repack` clears the flag the constructor stored, so that a forward in inference
  mode leaves the layout alone on any CPU;
- :func:`run_repacked_anywhere` lets a repacked model run where bitsandbytes has no kernel for
  that layout (no AVX512-BF16): the layer computes with the weight converted back by
  bitsandbytes' own inverse function (a copy; the model keeps its repacked layout);
- :func:`simulate_cpu_without_avx512_bf16` makes this process look like such a CPU to layers
  built afterwards.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    """Every bitsandbytes Linear4bit of ``model``."""
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_repacked(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is in bitsandbytes' AVX512-BF16 CPU layout."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def repack_for_cpu(model: nn.Module) -> int:
    """Repack every 4-bit weight as bitsandbytes' CPU forward does on AVX512-BF16; returns how many."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    count = 0
    for layer in linear4bit_layers(model):
        fix_4bit_weight_quant_state_from_module(layer)  # what forward does first
        if not is_repacked(layer):
            layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state
            )
            count += 1
    return count


def never_repack(model: nn.Module) -> None:
    """Make every Linear4bit of ``model`` behave as on a CPU without AVX512-BF16 (no repacking)."""
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False


def simulate_cpu_without_avx512_bf16(monkeypatch) -> None:
    """bitsandbytes' capability check answers False for Linear4bit layers built from now on."""
    monkeypatch.setattr(bnb_functional, "has_avx512bf16", lambda: False)
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)


def run_repacked_anywhere(monkeypatch) -> None:
    """Let repacked layers run on a CPU without bitsandbytes' AVX512-BF16 kernel (see the docstring)."""
    if bnb_functional.has_avx512bf16():
        return  # bitsandbytes has the kernel for the repacked layout here
    original = bnb.nn.Linear4bit.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_repacked(self):
            return original(self, x)
        repacked = self.weight.quant_state
        codes, _ = bnb_functional._convert_weight_packed_for_cpu_inverse(
            self.weight.data.clone(), copy.deepcopy(repacked)
        )
        # the inverse restores the codes; the scales are the bf16 absmax the CPU kernel multiplies by
        # (bitsandbytes 0.50's inverse leaves a non-nested absmax in the repacked [K/bs, N] order)
        state = bnb_functional.QuantState(
            absmax=repacked.absmax.t().reshape(-1).float(),
            shape=repacked.shape,
            code=repacked.code,
            blocksize=repacked.blocksize,
            quant_type=repacked.quant_type,
            dtype=torch.float32,
        )
        weight = bnb_functional.dequantize_4bit(codes.view(torch.uint8).reshape(-1, 1), state)
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), weight, bias).to(x.dtype)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)
