"""The output dtypes of a merged save and every name they go by: one table for the options, the
4-bit format's quant-state JSON and the GGUF file types. (safetensors' dtype codes are
fastsave.io.format's.)"""

from __future__ import annotations

import torch

OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# what users pass as dtype= (and torch's own names, with or without "torch.")
SPELLINGS = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# llama.cpp's names of the unquantized GGUF file types
GGUF_TYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of ``dtype`` without the module: "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_of_gguf_type(file_type: str) -> torch.dtype | None:
    """The dtype of an unquantized GGUF file type ("f16", "bf16", "f32"); None for a quantized one."""
    return {name: dtype for dtype, name in GGUF_TYPES.items()}.get(file_type)


# an integer dtype of each width, to compare floating values by their bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same dtype) hold the same bits, value by value: what "exact" means
    here. Unlike ``torch.equal`` on floating values, a NaN equals the same NaN, and -0.0 differs
    from 0.0 (a sum with a zero of the other sign can round to either)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS[a.dtype.itemsize]
    return torch.equal(a.view(bits), b.view(bits))
