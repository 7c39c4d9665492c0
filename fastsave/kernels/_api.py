"""Public entry points of ``fastsave.kernels``: dispatch check, 4-bit dequantize, fused LoRA merge.

Nothing here imports triton at module import time: ``import fastsave.kernels`` works without
triton installed; only calling a kernel without triton raises (RuntimeError).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Any

import torch

__all__ = ["REFERENCE_PATH_ENV", "available", "dequantize_4bit", "merge_lora_4bit"]

#: Set this environment variable to ``1`` to make :func:`available` return False, so callers take
#: their torch reference path instead of the Triton kernels (for debugging or bisecting).
REFERENCE_PATH_ENV = "FASTSAVE_REFERENCE_PATH"

_TRUE = {"1", "true", "yes", "on"}
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Code tables, written exactly as bitsandbytes' CUDA kernels hold them (csrc/kernels.cu:
# nf4_dequantization_lut, fp4_dequantization_lut). FP4 applies the sign bit as ``lut * -1.0``, so
# code 0b1000 decodes to -0.0 on CUDA; the same table is used here. The values equal
# ``bitsandbytes.functional.get_4bit_type``, except that its FP4 table holds +0.0 at code 8 (the
# Python literal ``-0`` there is the integer 0): only the sign of that zero differs.
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
_FP4_MAGNITUDE = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def available(device: torch.device | str | int) -> bool:
    """Whether the Triton kernels can serve tensors on ``device``.

    True when triton imports and either ``device`` is a CUDA device (and CUDA is available) or
    ``TRITON_INTERPRET=1`` is set (Triton's CPU interpreter: correct but slow, meant for tests).
    Always False when the environment variable ``FASTSAVE_REFERENCE_PATH=1`` is set, so that the
    caller falls back to its torch reference path.
    """
    if _env_true(REFERENCE_PATH_ENV):
        return False
    if not _triton_importable():
        return False
    if _env_true("TRITON_INTERPRET"):
        return True
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return dev.type == "cuda" and torch.cuda.is_available()


def _kernels_module() -> ModuleType:
    if not _triton_importable():
        raise RuntimeError(
            "fastsave.kernels needs triton to run its kernels, and triton is not importable here; "
            "install triton, or use the torch reference path (fastsave.kernels.available() is False)"
        )
    from . import _triton_kernels

    return _triton_kernels


@functools.cache
def _code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    mag = torch.tensor(_FP4_MAGNITUDE, dtype=torch.float32)
    return torch.cat([mag, mag * -1.0]).to(device)


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Flat, contiguous float32 copy-or-view of a small state tensor on ``device``."""
    return t.detach().to(device=device, dtype=torch.float32).contiguous().reshape(-1)


class _Prepared:
    """Validated, kernel-ready view of (qweight, quant_state)."""

    def __init__(self, qweight: torch.Tensor, quant_state: Any, dtype: torch.dtype | None):
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "quant_state is in bitsandbytes' CPU-repacked layout (packing_format_for_cpu=True, made by "
                "bitsandbytes.functional._convert_weight_packed_for_cpu when a Linear4bit runs on an "
                "AVX512-BF16 CPU). fastsave.kernels only decodes the standard layout; undo it with "
                "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse, or use the torch path."
            )
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        blocksize = int(quant_state.blocksize)
        if blocksize not in _BLOCKSIZES:
            raise ValueError(f"quant_state.blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
        if quant_state.shape is None:
            raise ValueError("quant_state.shape is None; the output shape is unknown")
        dtype = quant_state.dtype if dtype is None else dtype
        if dtype not in _OUT_KIND:
            raise ValueError(f"output dtype must be float32, float16 or bfloat16, got {dtype}")

        self.device = qweight.device
        mod = _kernels_module()
        if self.device.type == "cpu" and not mod.INTERPRETED:
            raise RuntimeError(
                "fastsave.kernels got CPU tensors, but its Triton kernels were built for a GPU: set "
                "TRITON_INTERPRET=1 before fastsave.kernels first runs a kernel to use Triton's CPU "
                "interpreter (slow, for tests), or use the torch reference path on CPU"
            )
        self.mod = mod
        self.shape = torch.Size(quant_state.shape)
        self.n = self.shape.numel()
        self.blocksize = blocksize
        self.dtype = dtype
        self.out_kind = _OUT_KIND[dtype]
        self.transpose_like_bnb = qweight.dim() >= 1 and qweight.shape[0] == 1

        q = qweight.detach()
        if not q.is_contiguous():
            q = q.contiguous()
        q = q.view(torch.uint8).reshape(-1)
        need = (self.n + 1) // 2
        if q.numel() < need:
            raise ValueError(
                f"qweight holds {q.numel()} bytes, but shape {tuple(self.shape)} needs {need} packed bytes"
            )
        self.qweight = q

        nblocks = -(-self.n // blocksize)
        absmax = quant_state.absmax
        if absmax.numel() < nblocks:
            raise ValueError(f"quant_state.absmax has {absmax.numel()} entries, {nblocks} needed")
        self.nested = bool(getattr(quant_state, "nested", False))
        if self.nested:
            state2 = quant_state.state2
            if absmax.dtype != torch.uint8:
                raise ValueError(f"nested quant_state.absmax must be uint8 codes, got {absmax.dtype}")
            self.absmax = absmax.detach().to(self.device).contiguous().reshape(-1)
            self.code2 = _f32(state2.code, self.device)
            if self.code2.numel() < 256:
                raise ValueError("quant_state.state2.code must have 256 entries")
            self.blocksize2 = int(state2.blocksize)
            if self.blocksize2 <= 0 or self.blocksize2 & (self.blocksize2 - 1):
                raise ValueError(f"state2.blocksize must be a power of two, got {self.blocksize2}")
            self.absmax2 = _f32(state2.absmax, self.device)
            if self.absmax2.numel() < -(-nblocks // self.blocksize2):
                raise ValueError("quant_state.state2.absmax is too short for the absmax codes")
            offset = quant_state.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset))
            self.offset = _f32(offset, self.device)
        else:
            # bitsandbytes upcasts a non-float32 absmax with .float() before it multiplies.
            self.absmax = _f32(absmax, self.device)
            self.code2 = self.absmax2 = self.offset = self.absmax  # unused placeholders
            self.blocksize2 = 256
        self.code = _code_table(quant_type, self.device)

    def absmax_args(self) -> tuple[torch.Tensor, ...]:
        return (self.absmax, self.code, self.code2, self.absmax2, self.offset)

    def launch_ctx(self) -> Any:
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# One program decodes this many elements (a [ROWS, COLS] tile, COLS = min(blocksize, tile)).
_DEQUANT_TILE = 4096


def dequantize_4bit(
    qweight: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode a bitsandbytes NF4/FP4 weight with one Triton kernel.

    Args:
        qweight: packed codes, two per byte, high nibble first, in row-major order of
            ``quant_state.shape`` (``Params4bit.data``); uint8 or any other ``quant_storage`` dtype,
            which is reinterpreted as bytes.
        quant_state: ``bitsandbytes.functional.QuantState`` (quant_type "nf4"/"fp4", blocksize
            32..4096, absmax float or, when ``nested``, uint8 codes decoded through ``state2``
            inside the kernel: ``state2.code[q] * state2.absmax[i // state2.blocksize] + offset``).
            The CPU-repacked state (``packing_format_for_cpu=True``) is refused with ValueError.
        dtype: output dtype (float32, float16, bfloat16); None means ``quant_state.dtype``.

    Returns:
        A new tensor of ``quant_state.shape`` on qweight's device. It is bit-identical to
        ``bitsandbytes.functional.dequantize_4bit`` on CUDA: value = code[nibble] * absmax in float32,
        one round-to-nearest-even cast to ``dtype``; FP4 code 0b1000 gives -0.0 as bnb's CUDA
        kernel does. Like bnb, a ``qweight`` whose first dimension is 1 yields the transpose.

    Raises:
        RuntimeError: triton is not importable, or CPU tensors without ``TRITON_INTERPRET=1``.
        ValueError: an unsupported or inconsistent quant_state / dtype.
    """
    p = _Prepared(qweight, quant_state, dtype)
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if p.n:
        cols = min(p.blocksize, _DEQUANT_TILE)
        rows = _DEQUANT_TILE // cols
        grid = (_cdiv(p.n, rows * cols),)
        absmax, code, code2, absmax2, offset = p.absmax_args()
        with p.launch_ctx():
            p.mod.dequant4_kernel[grid](
                p.qweight,
                absmax,
                code,
                code2,
                absmax2,
                offset,
                out,
                p.n,
                (p.n + 1) // 2,
                BLOCKSIZE=p.blocksize,
                BLOCKSIZE2=p.blocksize2,
                NESTED=p.nested,
                ROWS=rows,
                COLS=cols,
                OUT_KIND=p.out_kind,
                num_warps=4,
                enable_fp_fusion=False,
            )
    if p.transpose_like_bnb and out.dim() <= 2:
        return out.t()
    return out


def _merge_tiles(blocksize: int, row_absmax: bool, cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps) of the merge kernel.

    A tile holds 8192 outputs on GPU (4096 in the interpreter, whose cost grows with the tile).
    When rows are whole blocks, BLOCK_N <= blocksize keeps every tile row inside one block, so
    absmax is loaded once per row. The rank is consumed 16 at a time (tl.dot's minimum K).
    """
    block_n = min(128, blocksize) if row_absmax else 64
    block_m = max(16, (8192 if cuda else 4096) // block_n)
    return block_m, block_n, 16, 8


def merge_lora_4bit(
    qweight: torch.Tensor,
    quant_state: Any,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused ``dequantize(W) + scaling * (lora_B @ lora_A)`` with one rounding to ``dtype``.

    Args:
        qweight, quant_state: a 2-D 4-bit weight as for :func:`dequantize_4bit`;
            ``quant_state.shape`` must be ``(out_features, in_features)``.
        lora_A: ``[r, in_features]``, any float dtype and strides (upcast to float32 and moved
            to qweight's device; so are the small quant_state tensors).
        lora_B: ``[out_features, r]``, likewise.
        scaling: python float (peft's ``scaling[adapter]``), applied in float32.
        dtype: output dtype (float32, float16, bfloat16); None means ``quant_state.dtype``.

    Returns:
        A new ``[out_features, in_features]`` tensor computing, per element and in this op order,
        ``W = code[nibble] * absmax`` (float32), ``d = sum_r B[m, r] * A[r, n]`` (float32),
        ``d = d * float32(scaling)``, ``out = (W + d).to(dtype)`` -- the float32 reference
        ``(dequantize_4bit(W, fp32) + (B.float() @ A.float()) * scaling).to(dtype)`` with no
        fused multiply-add between the separate roundings.

    Exactness: the dequantized part, the scaling and the add are bit-exact. The only freedom is the
    summation order of the rank-r dot product: on GPU it is a float32 FMA chain over r in order
    (``tl.dot(..., input_precision="ieee")``, never TF32), while cuBLAS / CPU BLAS may order or
    block it differently. So ``d`` can differ from a BLAS reference by a few float32 ulps, which
    moves the result by at most one ulp of the output dtype for LoRA-sized deltas; for r == 1
    (and whenever the reference sums in the same order) the result is bit-identical.

    Raises:
        RuntimeError: triton is not importable, or CPU tensors without ``TRITON_INTERPRET=1``.
        ValueError: unsupported quant_state / dtype, or shapes that do not match.
    """
    p = _Prepared(qweight, quant_state, dtype)
    if len(p.shape) != 2:
        raise ValueError(f"merge_lora_4bit needs a 2-D weight, quant_state.shape is {tuple(p.shape)}")
    M, N = p.shape
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("lora_A and lora_B must be 2-D ([r, in_features] and [out_features, r])")
    R = lora_A.shape[0]
    if lora_A.shape[1] != N or lora_B.shape != (M, R):
        raise ValueError(
            f"LoRA shapes do not match the weight {M}x{N}: lora_A {tuple(lora_A.shape)} must be [r, {N}], "
            f"lora_B {tuple(lora_B.shape)} must be [{M}, r]"
        )
    if R < 1:
        raise ValueError("LoRA rank must be >= 1")
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise ValueError("lora_A and lora_B must be floating point")
    if N >= 2**31 - 4096:
        raise ValueError(f"in_features {N} too large for the merge kernel")
    a = lora_A.detach().to(device=p.device, dtype=torch.float32)
    b = lora_B.detach().to(device=p.device, dtype=torch.float32)
    # Round scaling to float32 on the host, as torch does for `float32_tensor * python_float`.
    scale32 = float(torch.tensor(float(scaling), dtype=torch.float32).item())

    out = torch.empty((M, N), dtype=p.dtype, device=p.device)
    if M == 0 or N == 0:
        return out
    row_absmax = N % p.blocksize == 0
    block_m, block_n, block_r, warps = _merge_tiles(p.blocksize, row_absmax, p.device.type == "cuda")
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    absmax, code, code2, absmax2, offset = p.absmax_args()
    with p.launch_ctx():
        p.mod.merge4_kernel[grid](
            p.qweight,
            absmax,
            code,
            code2,
            absmax2,
            offset,
            a,
            b,
            out,
            M,
            N,
            N // 2,
            R,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            scale32,
            BLOCKSIZE=p.blocksize,
            BLOCKSIZE2=p.blocksize2,
            NESTED=p.nested,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            EVEN_N=N % 2 == 0,
            ROW_ABSMAX=row_absmax and p.blocksize % block_n == 0,
            OUT_KIND=p.out_kind,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return out
