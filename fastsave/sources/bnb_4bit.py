"""A bitsandbytes 4-bit (NF4/FP4) weight, in the layout it is in now.

This is the "W" of W + delta: exactly what the model computes with. A packed weight is
dequantized with bitsandbytes' own dequantize asked for float32 (a shallow copy of the quant
state with dtype float32: code * absmax with no intermediate rounding), or with fastsave's Triton
kernel on CUDA. bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel the first time the
model runs in inference mode on such a CPU (layout changed, absmax un-nested and stored as bf16,
``quant_state.packing_format_for_cpu = True``); that layout is decoded here without touching the
model, because bitsandbytes' inverse re-quantizes a nested absmax and would change the weights the
user trained and evaluated.
"""

from __future__ import annotations

import copy
import logging
import math
from functools import cache
from types import SimpleNamespace

import torch
from torch import nn

from fastsave.dtypes import same_bits
from fastsave.sources import nf4_native
from fastsave.sources.backends import QuantizedLinear, optional_classes
from fastsave.sources.base import RowReader, RowReadFactors, RowReadMerged, Source
from fastsave.sources.bnb import bnb, bnb_functional, converted_from_conv1d, is_4bit_module
from fastsave.sources.settings_4bit import Quant4bitSettings

logger = logging.getLogger(__name__)

# Same layout constants as bitsandbytes' _convert_weight_packed_for_cpu: 32 rows a block, the low
# nibbles of a 64-value run first, then the high nibbles.
CPU_PACK_ROWS = 32
_CPU_PACK_HALF = 32


def settings_of(module: nn.Module) -> Quant4bitSettings:
    """The settings a bitsandbytes Linear4bit was quantized with (also after bitsandbytes' CPU repacking)."""
    weight = module.weight
    state = weight.quant_state
    repacked = getattr(state, "packing_format_for_cpu", False)
    nested = getattr(state, "original_nested", state.nested) if repacked else state.nested
    storage = getattr(weight, "quant_storage", None)
    if storage is None:
        storage = getattr(state, "original_storage_type", None) or (torch.uint8 if repacked else weight.dtype)
    return Quant4bitSettings(state.quant_type, int(state.blocksize), bool(nested), storage)


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The 16-bit dtype a Linear4bit's weight was quantized from."""
    state = module.weight.quant_state
    # After CPU repacking, quant_state.dtype is forced to bfloat16; original_dtype is the truth.
    return getattr(state, "original_dtype", None) or state.dtype


def absmax_float32(state) -> torch.Tensor:
    """The per-block absmax of a 4-bit QuantState in float32, the double-quantized one decoded."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.to(torch.float32)


def blocks_within_rows(state) -> bool:
    """Whether every quantization block of a 2-D 4-bit weight lies within one row (and rows are whole
    bytes), so that any range of rows decodes alone (:func:`row_range`)."""
    n_cols = state.shape[-1]
    return n_cols % state.blocksize == 0 and n_cols % 2 == 0


def row_range(
    flat_codes: torch.Tensor, state, absmax: torch.Tensor, i: int, j: int
) -> tuple[torch.Tensor, object]:
    """Rows ``i..j`` of a 2-D 4-bit weight whose quantization blocks lie within rows: their packed
    codes (from the flat byte view ``flat_codes``) and a quant state of their own, whose absmax is
    the slice of ``absmax`` (the weight's, already decoded to float32: nothing nested) and whose
    dtype is float32."""
    n_cols = state.shape[-1]
    per_row = n_cols // state.blocksize
    rows = copy.copy(state)
    rows.nested, rows.state2, rows.offset = False, None, None
    rows.absmax = absmax[i * per_row : j * per_row]
    rows.shape, rows.dtype = torch.Size([j - i, n_cols]), torch.float32
    return flat_codes[i * n_cols // 2 : j * n_cols // 2].reshape(-1, 1), rows


def decode_flat_blocks(codes: torch.Tensor, state) -> torch.Tensor:
    """code[nibble] * absmax[i // blocksize] over the flattened weight, high nibble first, in float32.

    bitsandbytes' native CPU kernel (0.50) indexes absmax per row, which is wrong when a
    quantization block straddles two rows; this decodes the flat blocks instead.
    """
    absmax = absmax_float32(state)
    count = math.prod(state.shape)
    flat = codes.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:count]
    values = state.code.to(device=codes.device, dtype=torch.float32)[nibbles.long()]
    scale = absmax.repeat_interleave(state.blocksize)[:count]
    return (values * scale).reshape(tuple(state.shape))


def decode_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode bitsandbytes' AVX512-BF16 CPU layout ([N, K/2] nibbles, absmax [K/bs, N] in bf16)."""
    n_rows, half_k = packed.shape
    k = half_k * 2
    runs = packed.reshape(-1, _CPU_PACK_HALF)
    nibbles = torch.cat([runs & 0xF, runs >> 4], dim=-1)  # the 64 values of one run, in order
    codes = (
        nibbles.reshape(n_rows // CPU_PACK_ROWS, half_k, CPU_PACK_ROWS, 2).transpose(1, 2).reshape(n_rows, k)
    )
    table = state.code.to(device=packed.device, dtype=torch.float32)
    absmax = state.absmax.t().to(torch.float32)  # [N, K / blocksize]
    values = table[codes.long()].reshape(n_rows, k // state.blocksize, state.blocksize)
    return (values * absmax.unsqueeze(-1)).reshape(n_rows, k)


def kernels_serve(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is on CUDA and fastsave.kernels can run there (FASTSAVE_REFERENCE_PATH=1: never)."""
    if tensor.device.type != "cuda":
        return False
    try:
        from fastsave import kernels
    except ImportError:
        return False
    return bool(kernels.available(tensor.device))


class Bnb4bitSource(Source):
    """A Linear4bit's weight, packed as bitsandbytes quantized it, on any device."""

    kind = "4-bit"
    computed = True

    def __init__(self, module: nn.Module) -> None:
        weight = module.weight
        state = weight.quant_state
        super().__init__(tuple(state.shape), weight.dtype, weight.device)
        self.module = module
        self.quant_settings = settings_of(module)

    @property
    def floating(self) -> bool:
        """Quantized codes of a floating-point weight."""
        return True

    def _codes(self) -> torch.Tensor:
        data = self.module.weight.data
        return data if data.dtype == torch.uint8 else data.view(torch.uint8)

    def float32(self) -> torch.Tensor:
        """bitsandbytes' dequantize in float32 (fastsave.kernels on CUDA), the model left unchanged."""
        state = self.module.weight.quant_state
        codes = self._codes()
        if kernels_serve(codes):
            from fastsave import kernels

            return kernels.dequantize_4bit(self.module.weight.data, state, dtype=torch.float32)
        if codes.device.type == "cpu" and state.shape[-1] % state.blocksize != 0:
            return decode_flat_blocks(codes, state)
        # A shallow copy with dtype float32 asks bitsandbytes for code * absmax in float32 with no
        # intermediate rounding; the model's own state object is left alone.
        state32 = copy.copy(state)
        state32.dtype = torch.float32
        return bnb_functional.dequantize_4bit(codes, state32)

    def packed_4bit(self) -> tuple[torch.Tensor, object]:
        """The packed codes and quant state, for fastsave.kernels' fused merge."""
        return self.module.weight.data, self.module.weight.quant_state

    def row_reader(self) -> RowReader | None:
        """Rows decoded where the codes are (bitsandbytes' dequantize; the kernels on a GPU they
        serve), into the CPU, when blocks do not straddle rows."""
        state = self.module.weight.quant_state
        codes = self._codes()
        if codes.device.type == "meta" or len(state.shape) != 2 or not blocks_within_rows(state):
            return None
        absmax = absmax_float32(state)  # decoded once a weight, not once a block
        flat = codes.reshape(-1)
        serve = kernels_serve(codes)

        def read(i: int, j: int) -> torch.Tensor:
            block, rows = row_range(flat, state, absmax, i, j)
            if serve:
                from fastsave import kernels

                return kernels.dequantize_4bit(block, rows, dtype=torch.float32).to("cpu")
            return bnb_functional.dequantize_4bit(block, rows).to("cpu")

        merged = _merged_rows_in_one_pass(flat, state, absmax)
        factors = _merged_rows_with_factors(flat, state, absmax) if merged is not None else None
        return RowReader(
            read,
            read_merged=merged,
            read_merged_factors=factors,
            held_bytes=absmax.numel() * absmax.element_size(),
        )


def _merged_rows_in_one_pass(flat_codes: torch.Tensor, state, absmax: torch.Tensor) -> RowReadMerged | None:
    """Rows of a 4-bit weight on the CPU dequantized, merged and rounded by one C pass
    (fastsave.merge.fused_rows), where the compiled library is here and its probe for these
    settings gives bitsandbytes' dequantize followed by the torch merge; else None."""
    if flat_codes.device.type != "cpu" or not nf4_native.available():
        return None
    if state.quant_type not in ("nf4", "fp4") or state.blocksize % 2 or state.code.numel() != 16:
        return None
    table = state.code.to(torch.float32).contiguous()
    if not one_pass_matches_bitsandbytes(state.quant_type, state.blocksize, tuple(table.tolist())):
        return None
    absmax = absmax.contiguous()
    blocksize, n_cols = state.blocksize, int(state.shape[-1])
    per_row = n_cols // blocksize

    def read_merged(i: int, j: int, product: torch.Tensor | None, scaling: float, out: torch.Tensor) -> int:
        codes = flat_codes[i * n_cols // 2 : j * n_cols // 2]
        return nf4_native.merge_4bit(
            codes, blocksize, table, absmax[i * per_row : j * per_row], product, scaling, out
        )

    return read_merged


def _merged_rows_with_factors(flat_codes: torch.Tensor, state, absmax: torch.Tensor) -> RowReadFactors | None:
    """The one pass of :func:`_merged_rows_in_one_pass` with the LoRA product computed in it from
    the factors (never written out whole), where that runs at vector speed here (AVX-512) and the
    blocks are whole vectors; else None. Called only where the one pass itself passed its probe."""
    if state.blocksize % 16 or not nf4_native.factors_fast():
        return None
    table, absmax = state.code.to(torch.float32).contiguous(), absmax.contiguous()
    blocksize, n_cols = state.blocksize, int(state.shape[-1])
    per_row = n_cols // blocksize

    def read_merged_factors(
        i: int, j: int, b: torch.Tensor, a: torch.Tensor, scaling: float, out: torch.Tensor
    ) -> int:
        codes = flat_codes[i * n_cols // 2 : j * n_cols // 2]
        return nf4_native.merge_4bit_factors(
            codes, blocksize, table, absmax[i * per_row : j * per_row], b, a, scaling, out
        )

    return read_merged_factors


@cache
def one_pass_matches_bitsandbytes(quant_type: str, blocksize: int, table: tuple[float, ...]) -> bool:
    """Whether the C pass over codes decoding to ``table`` gives the bits of bitsandbytes' dequantize
    followed by the torch merge (bfloat16 and float32 output, with and without a product), on values
    that reach every code (a zero block, a huge and a tiny one among them)."""
    generator = torch.Generator().manual_seed(0)
    n_cols = max(2 * blocksize, 256)
    weight = torch.randn(8, n_cols, generator=generator)
    weight[0] = 0.0
    weight[1] *= 1e30
    weight[2] *= 1e-30
    weight[3] = torch.linspace(-1.0, 1.0, n_cols)
    codes, state = bnb_functional.quantize_4bit(
        weight.to(torch.bfloat16), blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    dequantized = bnb_functional.dequantize_4bit(codes, state32)
    product = torch.randn(8, 4, generator=generator) @ torch.randn(4, n_cols, generator=generator)
    flat, values, absmax = codes.reshape(-1), torch.tensor(table, dtype=torch.float32), absmax_float32(state)
    for dtype in (torch.bfloat16, torch.float32):
        for delta in (product, None):
            expected = (dequantized + delta * 0.3 if delta is not None else dequantized).to(dtype)
            ours = torch.empty(8, n_cols, dtype=dtype)
            nf4_native.merge_4bit(flat, blocksize, values, absmax, delta, 0.3, ours)
            if not same_bits(ours, expected):
                logger.info(
                    "fastsave: the compiled 4-bit merge differs from bitsandbytes' dequantize for %s "
                    "blocksize %d; merging those weights with torch operations",
                    quant_type,
                    blocksize,
                )
                return False
    return True


class Bnb4bitCpuRepackedSource(Bnb4bitSource):
    """A Linear4bit's weight after bitsandbytes repacked it for its AVX512-BF16 CPU kernel."""

    kind = "4-bit (CPU-repacked)"

    def float32(self) -> torch.Tensor:
        """Decoded from the repacked layout (absmax as bitsandbytes keeps it there: bfloat16)."""
        return decode_cpu_packed(self.module.weight.data, self.module.weight.quant_state)

    def packed_4bit(self) -> None:
        """Not the layout the fused kernel reads."""
        return None

    def row_reader(self) -> RowReader:
        """Rows in groups of 32, the repacked layout's row blocks."""
        packed = self.module.weight.data
        state = self.module.weight.quant_state

        def read(i: int, j: int) -> torch.Tensor:
            rows = SimpleNamespace(code=state.code, blocksize=state.blocksize, absmax=state.absmax[:, i:j])
            return decode_cpu_packed(packed[i:j], rows)

        return RowReader(read, CPU_PACK_ROWS)


def bnb_4bit_source(module: nn.Module) -> Bnb4bitSource:
    """The source for a Linear4bit's weight, in whichever layout bitsandbytes holds it now."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        return Bnb4bitCpuRepackedSource(module)
    return Bnb4bitSource(module)


BACKEND = QuantizedLinear(
    name="bitsandbytes 4-bit",
    layer_classes=(bnb.nn.Linear4bit,) if bnb is not None else (),
    holds_quantized=is_4bit_module,
    source=bnb_4bit_source,
    compute_dtype=compute_dtype_of,
    transposed=converted_from_conv1d,
    lora_layer_classes=optional_classes(("peft.tuners.lora.bnb", "Linear4bit")),
)
