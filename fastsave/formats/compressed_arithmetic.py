"""compressed-tensors' data-free weight quantization, reproduced for a block of rows.

llm-compressor quantizes a Linear weight on the CPU in plain torch (compressed-tensors 0.19's
``calculate_qparams``, ``quantize`` and its compressors' packing, fed by the ``memoryless_minmax``
observer). Every step here is the same torch operation on the same dtypes, so the bits are the
same; what differs is only that it runs on one block of rows at a time, which changes nothing:

* a scale depends only on its own row (per channel), its own group of columns, or its own block of
  128 x 128 (a row block is a multiple of 128 rows), and min / max are exact in any order;
* quantizing and packing are elementwise or within a row.

The dtypes matter and are the library's: min, max and the scale are computed in the weight's dtype
(bfloat16 for a bfloat16 model, rounding at each step), the division ``w / scale`` too, except for
NVFP4 where the scale is divided by the float32 global scale first, which makes that division
float32. A scale of 0 (an all-zero group) becomes the scale dtype's epsilon.

The NVFP4 global scale needs the weight's (and its fused siblings') absolute maximum before any
row is quantized: :func:`absmax` gives it a block at a time, :func:`global_scale` turns it into the
scale exactly as ``generate_gparam`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from fastsave.compressed_schemes import CompressedScheme

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP4_MAX = 6.0
# E2M1 magnitudes by code, and the thresholds that round to them (ties: the even code's side)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MX_ELEMENT_OFFSET = 2  # floor(log2(6.0)): maps a group's maximum into E2M1's range
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors keeps a scale in: the weight's, float16 for anything else."""
    return weight_dtype if weight_dtype in SCALE_DTYPES else torch.float16


def _range(scheme: CompressedScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_min, q_max) as compressed-tensors builds them: float32 scalars."""
    if scheme.kind == "int":
        span = 2.0**scheme.num_bits
        return torch.tensor(-span / 2), torch.tensor(span / 2 - 1)
    top = FP8_MAX if scheme.num_bits == 8 else FP4_MAX
    return torch.tensor(-top), torch.tensor(top)


def _tiles(block: torch.Tensor, scheme: CompressedScheme) -> torch.Tensor:
    """A row block as its (block rows, block columns, height, width) tiles, padded with zeros to whole
    tiles as compressed-tensors pads (a zero changes no scale: 0 is always in the range)."""
    height, width = scheme.block
    rows, cols = block.shape
    pad_rows, pad_cols = (-rows) % height, (-cols) % width
    if pad_rows or pad_cols:
        block = torch.nn.functional.pad(block, (0, pad_cols, 0, pad_rows))
    return block.reshape(block.shape[0] // height, height, block.shape[1] // width, width).transpose(1, 2)


def _observed(block: torch.Tensor, scheme: CompressedScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale minimum and maximum of a row block, shaped like the scales."""
    if scheme.strategy == "channel":
        view = block.unsqueeze(-2)  # (rows, 1, cols)
    elif scheme.strategy == "block":
        view = _tiles(block, scheme).flatten(-2, -1)
    else:
        view = block.unflatten(-1, (-1, scheme.group_size))
    return torch.amin(view, dim=-1), torch.amax(view, dim=-1)


def absmax(block: torch.Tensor, scheme: CompressedScheme) -> torch.Tensor:
    """The largest magnitude of a row block, by way of its per-group min and max (the observer's)."""
    low, high = _observed(block, scheme)
    return torch.max(high.max(), -low.min())


def global_scale(largest: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor scale from the largest magnitude (in the weight's dtype), float32 [1]."""
    largest = torch.clamp(largest, min=torch.finfo(largest.dtype).tiny)
    scale = FP8_MAX * FP4_MAX / largest
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.to(torch.float32).reshape([1])


def _round_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """Round to a power of two: add half an E2M1 step to the mantissa, keep sign and exponent."""
    mantissa, exponent, int_dtype = {
        torch.bfloat16: (7, 8, torch.uint16),
        torch.float16: (10, 5, torch.uint16),
        torch.float32: (23, 8, torch.uint32),
    }[x.dtype]
    bits = x.view(int_dtype).to(torch.int32)
    add = 1 << (mantissa - 1 - 1)  # E2M1 has one mantissa bit
    keep = ((1 << (exponent + 1)) - 1) << mantissa
    rounded = torch.bitwise_and(bits + add, keep)
    return rounded.to(int_dtype).view(x.dtype) if int_dtype is torch.uint16 else rounded.view(x.dtype)


@dataclass
class QuantizedRows:
    """One row block, quantized: codes (unpacked), scales as kept, zero points (asymmetric only)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None


def _scales(
    low: torch.Tensor, high: torch.Tensor, scheme: CompressedScheme, shared: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``calculate_qparams``: the scale (in the weight's dtype unless stated) and the zero point."""
    low = torch.min(low, torch.zeros_like(low))
    high = torch.max(high, torch.zeros_like(high))
    q_min, q_max = _range(scheme)
    span = q_max - q_min
    if scheme.symmetric:
        largest = torch.max(torch.abs(low), torch.abs(high))
        if scheme.scale_dtype == "e8m0":
            exponents = 127 + torch.floor(torch.log2(_round_to_power_of_two(largest))) - MX_ELEMENT_OFFSET
            scales = exponents
        else:
            scales = largest / (span.to(largest.dtype) / 2)
        zero_points = None
    else:
        scales = (high - low) / span.to(high.dtype)
        zero_points = torch.clamp(q_min - (low / scales), q_min, q_max)
    if shared is not None:
        scales = shared * scales
    if scheme.scale_dtype == "float8_e4m3fn":
        scales = torch.clamp(scales, -FP8_MAX, FP8_MAX).to(FP8).to(scales.dtype)
    elif scheme.scale_dtype == "e8m0":
        as_uint8 = torch.round(torch.clamp(scales, 0, 255)).to(torch.uint8).to(scales.dtype)
        scales = (2.00 ** ((as_uint8.to(torch.int32) - 127).to(torch.float))).to(scales.dtype)
    if scheme.scale_dtype == "float8_e4m3fn":
        eps = 0.125
    elif scheme.scale_dtype == "e8m0":
        eps = 1.0
    else:
        eps = torch.finfo(scales.dtype).eps
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype), scales)
    if zero_points is not None:
        zero_points = torch.round(torch.clamp(zero_points, -128, 127)).to(torch.int8)
    return scales, zero_points


def _round_fp4(scaled: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (sign bit 8, magnitude 0-7) of values already in [-6, 6], as compressed-tensors rounds.

    Its thresholds, each side as it has them (ties go to the even code); compared in float32, which
    holds every bfloat16 / float16 value exactly, so the answers are the same and faster.
    """
    magnitude = torch.abs(scaled).float()
    code = (magnitude > 0.25).to(torch.uint8)
    for threshold, inclusive in (
        (0.75, True),
        (1.25, False),
        (1.75, True),
        (2.5, False),
        (3.5, True),
        (5.0, False),
    ):
        code += (magnitude >= threshold) if inclusive else (magnitude > threshold)
    # compressed-tensors multiplies the magnitude by sign(x) and packs the sign bit of the product: a
    # negative value rounded to 0 keeps its sign bit, -0.0 (whose sign is +0) does not
    code |= (scaled < 0).to(torch.uint8) << 3
    return code


def quantize_rows(
    block: torch.Tensor, scheme: CompressedScheme, shared: torch.Tensor | None = None
) -> QuantizedRows:
    """Quantize a block of whole rows of a weight (a multiple of the scheme's block height).

    ``shared``: NVFP4's global scale (float32 [1]) of this weight.
    """
    low, high = _observed(block, scheme)
    scales, zero_points = _scales(low, high, scheme, shared)
    kept = scales.to(scale_dtype_for(block.dtype))  # the module's scale parameter
    q_min, q_max = _range(scheme)
    divisor = kept / shared if shared is not None else kept
    if scheme.strategy == "channel":
        scaled = block / divisor
    elif scheme.strategy == "block":
        tiles = _tiles(block, scheme) / divisor.unsqueeze(-1).unsqueeze(-1)
        whole_rows, whole_cols = tiles.shape[0] * tiles.shape[2], tiles.shape[1] * tiles.shape[3]
        rows, cols = block.shape
        scaled = tiles.transpose(1, 2).reshape(whole_rows, whole_cols)[:rows, :cols]
    else:
        scaled = block.unflatten(-1, (-1, scheme.group_size)) / divisor.unsqueeze(-1)
        if zero_points is not None:
            scaled += zero_points.to(block.dtype).unsqueeze(-1)
    if zero_points is None and scheme.scale_dtype is None:
        # llm-compressor's modules hold a zero point of zeros until they are compressed, and the
        # integer / FP8 compressors add it: -0.0 becomes +0.0 (the FP4 ones pass none)
        scaled = scaled + torch.zeros((), dtype=scaled.dtype)
    scaled = torch.clamp(scaled, q_min, q_max)
    if scheme.kind == "int":
        codes = torch.round(scaled).to(torch.int8)
    elif scheme.num_bits == 8:
        codes = scaled.to(FP8)
    else:
        codes = _round_fp4(scaled)
    codes = codes.reshape(block.shape)
    if scheme.scale_dtype == "float8_e4m3fn":
        stored = kept.to(FP8)
    elif scheme.scale_dtype == "e8m0":
        stored = (127 + torch.floor(torch.log2(kept)).to(torch.int32)).to(torch.uint8)
    else:
        stored = kept
    return QuantizedRows(codes, stored, zero_points)


def pack_int(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` along rows: 32 / num_bits offset codes per int32, low bits first."""
    rows, cols = codes.shape
    per_word = 32 // num_bits
    if sys.byteorder == "little" and num_bits in (4, 8) and cols % per_word == 0:
        # whole words: the offset code (code + 2^(bits-1)) is the two's complement byte with its top
        # bit flipped, and on a little-endian machine a word's low bits are its first byte
        # (viewed flat: a one-row result may carry any stride on its size-1 dimension)
        if num_bits == 8:
            packed = codes.contiguous().view(torch.uint8) ^ 0x80
        else:
            nibbles = (codes.contiguous().view(torch.uint8) & 0x0F) ^ 0x08
            packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return packed.reshape(-1).view(torch.int32).reshape(rows, -1)
    values = codes.to(torch.int64) + (1 << (num_bits - 1))
    padded_cols = -(-cols // 32) * 32
    if padded_cols > cols:  # compressed-tensors pads with zeros after the offset: they are not codes
        values = torch.nn.functional.pad(values, (0, padded_cols - cols))
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    words = (values.reshape(rows, -1, per_word) << shifts).sum(-1)
    packed_cols = -(-cols * num_bits // 32)
    # the int32 of each word's low 32 bits (two's complement), as an int32 scatter_add_ leaves it
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)[:, :packed_cols].contiguous()


def pack_zero_points(zero_points: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Zero points (rows, groups) packed down the rows, as compressed-tensors stores them."""
    return pack_int(zero_points.T.contiguous(), num_bits).T.contiguous()


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte, the first of each pair in the low nibble."""
    pairs = codes.reshape(codes.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
