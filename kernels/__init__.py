"""Triton kernels for fastsave, installed as ``fastsave.kernels``.

This folder must never be importable as a top-level ``kernels`` module: bitsandbytes and
transformers probe ``import kernels`` (the Hugging Face kernels package) and would pick ours up
when the repository root is on ``sys.path`` (``python`` started in a checkout). Imported under
that name, this file turns itself into an empty PEP 420-like namespace: no ``__file__``, no
``__version__``, no API, nothing below it. transformers' probe then reports "not installed" (it
treats exactly that as a shadowing namespace) and bitsandbytes' ``from kernels import get_kernel``
fails with the ImportError it expects, which is the truth. Raising here instead would crash
``import transformers``, which does not catch errors from that import.
"""

if __name__ != "fastsave.kernels":
    del __file__
    __path__: list[str] = []
    __all__: list[str] = []
else:
    from ._api import REFERENCE_PATH_ENV, available, dequantize_4bit, merge_lora_4bit

    __all__ = ["REFERENCE_PATH_ENV", "available", "dequantize_4bit", "merge_lora_4bit"]
