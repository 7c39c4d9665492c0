"""Triton kernels for fastsave, installed as ``fastsave.kernels``.

This folder must never be importable as a top-level ``kernels`` module: bitsandbytes and
transformers probe ``import kernels`` (the Hugging Face kernels package) and would pick ours up
when the repository root is on ``sys.path``. Refusing the top-level name keeps their probe
reporting "not installed", which is the truth.
"""

if __name__ != "fastsave.kernels":
    raise ImportError(
        "fastsave's kernels folder is only importable as 'fastsave.kernels', not as a top-level "
        f"'{__name__}' module"
    )

from ._api import REFERENCE_PATH_ENV, available, dequantize_4bit, merge_lora_4bit

__all__ = ["REFERENCE_PATH_ENV", "available", "dequantize_4bit", "merge_lora_4bit"]
