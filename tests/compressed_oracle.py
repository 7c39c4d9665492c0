"""The oracle of the compressed-tensors saves: compressed-tensors' own functions, never fastsave's.

llm-compressor's data-free ``oneshot`` does, for each Linear weight: observe its min and max per
scale (the ``memoryless_minmax`` observer: per row, per group of columns, or per 128x128 block,
padded with zeros), give NVFP4 weights one global scale from the largest magnitude of their fused
siblings (q/k/v, gate/up), compute the scale and zero point with ``calculate_qparams``, keep the
scale in the weight's dtype, and compress with the scheme's compressor. This module does those steps
with compressed-tensors' functions (llm-compressor itself pins an older transformers, so it is run
in its own environment by scripts/compare_llmcompressor.py instead).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

FORMATS = {
    "FP8_DYNAMIC": "float-quantized",
    "FP8_BLOCK": "float-quantized",
    "W8A16": "pack-quantized",
    "W4A16": "pack-quantized",
    "W4A16_ASYM": "pack-quantized",
    "NVFP4A16": "nvfp4-pack-quantized",
    "MXFP4A16": "mxfp4-pack-quantized",
}


def _strategy(args) -> str:
    return getattr(args.strategy, "value", args.strategy)


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The observer's per-scale min and max (llm-compressor's flatten_for_calibration + amin/amax)."""
    strategy = _strategy(args)
    if strategy == "channel":
        view = weight.unsqueeze(-2).unsqueeze(0)
    elif strategy in ("group", "tensor_group"):
        view = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    else:
        height, width = args.block_structure
        rows, cols = weight.shape
        weight = torch.nn.functional.pad(weight, (0, (-cols) % width, 0, (-rows) % height))
        rows, cols = weight.shape
        view = (
            weight.reshape(rows // height, height, cols // width, width)
            .transpose(1, 2)
            .flatten(-2, -1)
            .unsqueeze(0)
        )
    return torch.amin(view, dim=(0, -1)), torch.amax(view, dim=(0, -1))


def compress(weights: dict[str, torch.Tensor], preset: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each weight's compressed tensors; the weights given together are fused siblings (one global scale)."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    stats = {name: observe(weight, args) for name, weight in weights.items()}
    shared = None
    if _strategy(args) == "tensor_group":
        largest = None
        for low, high in stats.values():
            found = torch.max(high.max(), -low.min())
            largest = found if largest is None else torch.max(largest, found)
        shared = generate_gparam(-largest.reshape(1), largest.reshape(1))
    compressor = BaseCompressor.load_from_registry(FORMATS[preset])
    out = {}
    for name, weight in weights.items():
        scale, zero_point = calculate_qparams(stats[name][0], stats[name][1], args, global_scale=shared)
        state = {
            "weight": weight,
            "weight_scale": scale.to(weight.dtype),  # the module's scale parameter has the weight's dtype
            "weight_zero_point": zero_point.to(args.zp_dtype),
        }
        if shared is not None:
            state["weight_global_scale"] = shared
        out[name] = dict(compressor.compress(state, scheme))
    return out


def decompress(state: dict[str, torch.Tensor], preset: str) -> torch.Tensor:
    """compressed-tensors' own dequantization of one weight's compressed tensors."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    compressor = BaseCompressor.load_from_registry(FORMATS[preset])
    return compressor.decompress(dict(state), scheme)["weight"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 compared as bytes: -0.0 and NaN patterns count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)
