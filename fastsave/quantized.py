"""Read a base layer's weight as float32, whatever bitsandbytes did to it.

This is the "W" of W + delta: exactly what the model computes with right now. A 4-bit weight is
dequantized (fastsave.kernels on CUDA, bitsandbytes' own dequantize on CPU); a weight that
bitsandbytes repacked for its AVX512-BF16 CPU kernel (DESIGN.md, hazard 1) is decoded from that
layout without touching the model, because bitsandbytes' inverse re-quantizes a nested absmax and
so would change the weights the user trained and evaluated.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn

try:  # bitsandbytes is a dependency, but a plain-LoRA model must not need it to import
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # pragma: no cover - exercised only without bitsandbytes
    bnb = None
    bnb_functional = None

# Same layout constants as bitsandbytes' _convert_weight_packed_for_cpu: 32 rows a block, the
# low nibbles of a 64-value run first, then the high nibbles.
_CPU_PACK_BLOCK_N = 32
_CPU_PACK_HALF = 32


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (NF4 or FP4) whose weight is quantized."""
    weight = getattr(module, "weight", None)
    return (
        bnb is not None
        and isinstance(module, bnb.nn.Linear4bit)
        and getattr(weight, "quant_state", None) is not None
    )


def is_8bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear8bitLt (LLM.int8) whose weight holds int8 codes."""
    return (
        bnb is not None
        and isinstance(module, bnb.nn.Linear8bitLt)
        and getattr(module.weight, "dtype", None) == torch.int8
    )


def is_quantized(module: nn.Module) -> bool:
    """True when the module's weight is stored quantized by bitsandbytes."""
    return is_4bit(module) or is_8bit(module)


def stored_transposed(module: nn.Module) -> bool:
    """True for a bitsandbytes layer that transformers made from a ``Conv1D`` (GPT-2 and kin).

    transformers quantizes a Conv1D into a Linear4bit / Linear8bitLt by transposing its (in, out)
    weight to (out, in) first (it marks the layer with ``source_cls``); a 16-bit checkpoint of the
    architecture still stores the Conv1D layout, so the weight has to be transposed back on save.
    """
    source = getattr(module, "source_cls", None)
    if not isinstance(source, type) or not is_quantized(module):
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return issubclass(source, Conv1D)


def logical_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of the weight as a 16-bit checkpoint stores it.

    (out_features, in_features) for a linear layer, (in_features, out_features) for a quantized
    layer that replaced a Conv1D (see :func:`stored_transposed`), the parameter's shape otherwise.
    """
    shape = tuple(module.weight.quant_state.shape) if is_4bit(module) else tuple(module.weight.shape)
    return shape[::-1] if stored_transposed(module) else shape


def to_checkpoint_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (in the module's compute layout) in the layout the 16-bit checkpoint stores."""
    return weight.T if stored_transposed(module) else weight


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype the module's weight represents: the 16-bit dtype it was quantized from."""
    if is_4bit(module):
        state = module.weight.quant_state
        # After CPU repacking, quant_state.dtype is forced to bfloat16; original_dtype is the truth.
        return getattr(state, "original_dtype", None) or state.dtype
    if is_8bit(module):
        return module.bias.dtype if module.bias is not None else torch.float16
    return module.weight.dtype


def use_kernels(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is on CUDA and fastsave.kernels can run there (FASTSAVE_REFERENCE_PATH=1: never)."""
    if tensor.device.type != "cuda" or os.environ.get("FASTSAVE_REFERENCE_PATH") == "1":
        return False
    try:
        from fastsave import kernels
    except ImportError:
        return False
    available = getattr(kernels, "available", None)
    return bool(available and available(tensor.device))


def dequantize_4bit_float32(module: nn.Module) -> torch.Tensor:
    """Dequantize a Linear4bit weight to float32 on its own device, leaving the module unchanged."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, state)
    if use_kernels(weight.data):
        from fastsave import kernels

        return kernels.dequantize_4bit(weight.data, state, dtype=torch.float32)
    # A shallow copy with dtype float32 asks bitsandbytes for the float32 product code * absmax
    # with no intermediate rounding; the model's own state object is left alone.
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    codes = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
    if codes.device.type == "cpu" and state.shape[-1] % state.blocksize != 0:
        # bitsandbytes' native CPU kernel (0.50) indexes absmax per row, which is wrong when a
        # quantization block straddles two rows; decode the flat blocks here instead.
        return _dequantize_flat_blocks(codes, state)
    return bnb_functional.dequantize_4bit(codes, state32)


def absmax_float32(state) -> torch.Tensor:
    """The per-block absmax of a 4-bit QuantState in float32, the double-quantized one decoded."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.to(torch.float32)


def _dequantize_flat_blocks(codes: torch.Tensor, state) -> torch.Tensor:
    """code[nibble] * absmax[i // blocksize] over the flattened weight, high nibble first, in float32."""
    absmax = absmax_float32(state)
    count = math.prod(state.shape)
    flat = codes.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:count]
    values = state.code.to(device=codes.device, dtype=torch.float32)[nibbles.long()]
    scale = absmax.repeat_interleave(state.blocksize)[:count]
    return (values * scale).reshape(tuple(state.shape))


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode bitsandbytes' AVX512-BF16 CPU layout ([N, K/2] nibbles, absmax [K/bs, N] in bf16)."""
    n_rows, half_k = packed.shape
    k = half_k * 2
    runs = packed.reshape(-1, _CPU_PACK_HALF)
    nibbles = torch.cat([runs & 0xF, runs >> 4], dim=-1)  # the 64 values of one run, in order
    codes = (
        nibbles.reshape(n_rows // _CPU_PACK_BLOCK_N, half_k, _CPU_PACK_BLOCK_N, 2)
        .transpose(1, 2)
        .reshape(n_rows, k)
    )
    table = state.code.to(device=packed.device, dtype=torch.float32)
    absmax = state.absmax.t().to(torch.float32)  # [N, K / blocksize]
    values = table[codes.long()].reshape(n_rows, k // state.blocksize, state.blocksize)
    return (values * absmax.unsqueeze(-1)).reshape(n_rows, k)


def int8_row_scale(module: nn.Module) -> torch.Tensor:
    """The per-row scale (SCB) of an LLM.int8 weight, in float32: on the parameter or the layer state."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return scb.to(torch.float32)


def dequantize_8bit_float32(module: nn.Module) -> torch.Tensor:
    """Dequantize an LLM.int8 weight (int8 codes times a per-row scale / 127) to float32."""
    return bnb_functional.int8_vectorwise_dequant(module.weight.data, int8_row_scale(module)).to(
        torch.float32
    )


def base_weight_float32(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with, as a float32 tensor on the module's device.

    A new tensor is always returned (never a view of the model's parameter), so the caller may
    add to it in place.
    """
    if is_4bit(module):
        return dequantize_4bit_float32(module)
    if is_8bit(module):
        return dequantize_8bit_float32(module)
    return module.weight.detach().to(torch.float32, copy=True)
