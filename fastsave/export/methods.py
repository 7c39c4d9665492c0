"""GGUF quantization methods: Unsloth's names and aliases, and which llama.cpp step makes each.

``quantization_method`` is one name or a list, as in Unsloth's ``save_pretrained_gguf``; the
default ``"fast_quantized"`` is q8_0. convert_hf_to_gguf.py writes f32, f16, bf16 and q8_0 itself;
every other type is made from a 16-bit GGUF by llama.cpp's llama-quantize.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

DEFAULT_METHOD = "fast_quantized"
# Unsloth's aliases. "not_quantized" keeps the 16-bit dtype the merged checkpoint has (Unsloth
# writes f16); None is q8_0, as in Unsloth.
ALIASES = {"fast_quantized": "q8_0", "quantized": "q4_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
NOT_QUANTIZED = "not_quantized"
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py --outtype writes
# Made by llama-quantize (Unsloth's ALLOWED_QUANTS; q2_k_l is Unsloth's preset of q2_k with q8_0
# output and token embeddings).
QUANTIZED_TYPES = (
    "q2_k", "q2_k_l", "q3_k_s", "q3_k_m", "q3_k_l", "q3_k_xs", "q4_0", "q4_1", "q4_k_s", "q4_k_m",
    "q5_0", "q5_1", "q5_k_s", "q5_k_m", "q6_k",
)  # fmt: skip
# Importance-matrix quants: llama-quantize refuses them without imatrix_file.
IMATRIX_TYPES = (
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs",
)  # fmt: skip
_FULL_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0}


def normalize_methods(
    value: str | Sequence[str | None] | None, sixteen_bit: str, imatrix: bool = False
) -> list[str]:
    """The GGUF types to write, lower-case, aliases resolved, duplicates dropped, in the order given.

    ``sixteen_bit`` ("f16" or "bf16") is what "not_quantized" means for this model.

    Raises:
        ValueError: an unknown method, or an importance-matrix type without ``imatrix_file``.
    """
    if value is None or isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"quantization_method must be a name such as 'q8_0' or a list of names, got {value!r}"
        )
    methods = []
    for item in value:
        if item is None:
            item = "q8_0"
        if not isinstance(item, str):
            raise ValueError(f"quantization_method entries must be strings, got {item!r}")
        name = item.strip().lower()
        name = sixteen_bit if name == NOT_QUANTIZED else ALIASES.get(name, name)
        if name in IMATRIX_TYPES and not imatrix:
            raise ValueError(
                f"quantization_method={item!r} is an importance-matrix quant: llama-quantize needs "
                "imatrix_file='path/to/imatrix.dat' (fastsave never downloads one)"
            )
        if name not in DIRECT_OUTTYPES + QUANTIZED_TYPES + IMATRIX_TYPES:
            known = ", ".join(
                ("not_quantized", "fast_quantized", "quantized", *DIRECT_OUTTYPES, *QUANTIZED_TYPES)
            )
            raise ValueError(f"quantization_method={item!r} is unknown: use one of {known}")
        if name not in methods:
            methods.append(name)
    return methods


def first_conversion(methods: list[str], sixteen_bit: str, requested: str | None = None) -> str:
    """The converter's --outtype: the one requested method when the converter writes it, else 16-bit.

    Every other type is quantized from that first file, so all of them come from the same weights.
    """
    if requested is not None:
        requested = requested.strip().lower()
        if requested not in DIRECT_OUTTYPES:
            raise ValueError(f"first_conversion={requested!r} must be one of {', '.join(DIRECT_OUTTYPES)}")
        return requested
    if len(methods) == 1 and methods[0] in DIRECT_OUTTYPES:
        return methods[0]
    return sixteen_bit


def bits_per_weight(method: str) -> float:
    """An upper bound of a type's size per weight, for the disk-space check."""
    if method in _FULL_BITS:
        return _FULL_BITS[method]
    nominal = re.match(r"^i?q(\d)", method)
    return (float(nominal.group(1)) if nominal else 16.0) + 1.5  # block scales and mins


def file_type_name(method: str) -> str:
    """The type as it appears in a GGUF file name and in llama-quantize's arguments (Q4_K_M)."""
    return method.upper()


_NAME_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-8bit")


def is_lora(save_method: Any) -> bool:
    """save_method asks for the adapter alone (Unsloth's save_method="lora" on its GGUF methods)."""
    from fastsave.options import normalize_save_method

    return save_method is not None and normalize_save_method(save_method) == "lora"


def gguf_stem(model: Any) -> str:
    """The model part of the GGUF file names: the base model's name, without Unsloth's 4-bit suffix."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    name = str(getattr(getattr(inner, "config", None), "_name_or_path", "") or "").rstrip("/\\")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _NAME_SUFFIXES:
        name = name.removesuffix(suffix)
    return name if name and name not in (".", "..") else "model"
