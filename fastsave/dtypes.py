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
