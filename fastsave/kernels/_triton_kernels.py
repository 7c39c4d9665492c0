"""Triton kernels behind ``fastsave.kernels`` (imported lazily, only when a kernel runs).

Whether these run compiled (CUDA/ROCm) or under Triton's CPU interpreter is decided by
``TRITON_INTERPRET`` at the moment this module is first imported, because ``@triton.jit``
picks the implementation when it decorates. ``INTERPRETED`` records the choice.

Exactness rules every kernel here follows (see ``_api.py`` for the contract):

* every float op is a separate IEEE float32 op in the same order as the torch reference; the
  launcher passes ``enable_fp_fusion=False`` so the compiler never contracts ``a * b + c`` into an
  FMA (which would skip a rounding the reference performs);
* float32 -> bfloat16 is done with integer arithmetic (round to nearest even, NaN -> 0x7FC0, the
  same as torch's CPU cast and CUDA's ``cvt.rn``). Triton's interpreter truncates on that cast, so
  doing it by hand keeps the interpreted and compiled kernels identical;
* ``tl.dot`` runs with ``input_precision="ieee"`` (float32 FMA, never TF32).

Only builtins of ``triton.language.core`` are used, none of the ``@jit`` helpers of
``triton.language.standard`` (``tl.zeros``, ``tl.cdiv``, ...): those are decorated when triton is
first imported (bitsandbytes imports it early), so under a late TRITON_INTERPRET=1 they would stay
compiled-only and fail inside the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)

# Output dtype selector (a constexpr, so each kind compiles to its own kernel).
OUT_FLOAT32: int = 0
OUT_FLOAT16: int = 1
OUT_BFLOAT16: int = 2


@triton.jit
def _absmax_f32(
    absmax_ptr,
    idx,
    mask,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
):
    """float32 absmax for block indices ``idx`` (any shape).

    Nested (double-quantized) absmax is decoded the way bitsandbytes does it:
    ``dequantize_blockwise(codes, state2)`` = ``code2[q] * absmax2[i // BLOCKSIZE2]`` in float32,
    then ``+ offset`` as a second, separately rounded float32 op.
    """
    if NESTED:
        q = tl.load(absmax_ptr + idx, mask=mask, other=0).to(tl.int32)
        c = tl.load(code2_ptr + q, mask=mask, other=0.0)
        s = tl.load(absmax2_ptr + idx // BLOCKSIZE2, mask=mask, other=0.0)
        off = tl.load(offset_ptr)
        am = c * s
        am = am + off
    else:
        am = tl.load(absmax_ptr + idx, mask=mask, other=0.0)
    return am


@triton.jit
def _cast_out(x, OUT_KIND: tl.constexpr):
    """Round a float32 tile to the output dtype (round to nearest even)."""
    if OUT_KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        # Only the low 16 bits of (r >> 16) are kept, so arithmetic vs logical shift is moot.
        r = bits + 0x7FFF + ((bits >> 16) & 1)
        r = tl.where(x != x, 0x7FC00000, r)
        return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 1:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def dequant4_kernel(
    q_ptr,
    absmax_ptr,
    code_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    n,
    nbytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """Dequantize ROWS*COLS consecutive elements of the flattened tensor per program.

    The program's slice is viewed as a [ROWS, COLS] tile with COLS = min(blocksize, tile), so
    every tile row lies inside one quantization block: absmax is loaded once per row and
    broadcast. Packed bytes are loaded as one contiguous [ROWS, COLS/2] uint8 tile, split into
    (high, low) nibbles and interleaved back with join + reshape (high nibble = even element).
    """
    pid = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = COLS // 2
    rows = tl.arange(0, ROWS)
    byte_off = pid * (ROWS * HALF) + rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(q_ptr + byte_off, mask=byte_off < nbytes, other=0)
    hi = (packed >> 4).to(tl.int32)
    lo = (packed & 0xF).to(tl.int32)
    nib = tl.reshape(tl.join(hi, lo), (ROWS, COLS))
    vals = tl.load(code_ptr + nib)

    row_start = pid * (ROWS * COLS) + rows * COLS
    am = _absmax_f32(
        absmax_ptr,
        row_start // BLOCKSIZE,
        row_start < n,
        code2_ptr,
        absmax2_ptr,
        offset_ptr,
        BLOCKSIZE2,
        NESTED,
    )
    res = vals * am[:, None]
    offs = row_start[:, None] + tl.arange(0, COLS)[None, :]
    tl.store(out_ptr + offs, _cast_out(res, OUT_KIND), mask=offs < n)


@triton.jit
def merge4_kernel(
    q_ptr,
    absmax_ptr,
    code_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    N_half,
    R,
    stride_ar,
    stride_an,
    stride_bm,
    stride_br,
    scaling,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_N: tl.constexpr,
    ROW_ABSMAX: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """out[m, n] = cast(W[m, n] + (sum_r B[m, r] * A[r, n]) * scaling) for one [BLOCK_M, BLOCK_N] tile.

    ``N_half`` is N // 2, passed separately so Triton's divisibility specialisation sees it and
    vectorizes the packed-byte loads of the EVEN_N path.

    W is the 4-bit weight [M, N] (row-major flattened for packing and blocks), A is [R, N] and B is
    [M, R], both float32. The rank is consumed BLOCK_R at a time (zero-padded): on GPU the ieee
    dot is a float32 FMA chain over r in order, so the chunking does not change the result.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    mask = mask_m[:, None] & mask_n[None, :]
    flat = rm[:, None] * N + rn[None, :]

    # LoRA delta in float32: (B @ A) rounded, then * scaling as its own rounding.
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    rk = tl.arange(0, BLOCK_R)
    for k0 in range(0, R, BLOCK_R):
        kk = k0 + rk
        b = tl.load(
            b_ptr + rm[:, None] * stride_bm + kk[None, :] * stride_br,
            mask=mask_m[:, None] & (kk[None, :] < R),
            other=0.0,
        )
        a = tl.load(
            a_ptr + kk[:, None] * stride_ar + rn[None, :] * stride_an,
            mask=(kk[:, None] < R) & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(b, a, acc, input_precision="ieee")
    delta = acc * scaling

    # Dequantized weight tile in float32.
    if EVEN_N:
        HALF: tl.constexpr = BLOCK_N // 2
        hcols = tl.arange(0, HALF)
        bcol = pid_n * HALF + hcols
        byte_off = rm[:, None] * N_half + bcol[None, :]
        bmask = mask_m[:, None] & (bcol < N_half)[None, :]
        packed = tl.load(q_ptr + byte_off, mask=bmask, other=0)
        hi = (packed >> 4).to(tl.int32)
        lo = (packed & 0xF).to(tl.int32)
        nib = tl.reshape(tl.join(hi, lo), (BLOCK_M, BLOCK_N))
    else:
        packed = tl.load(q_ptr + flat // 2, mask=mask, other=0)
        nib = tl.where(flat % 2 == 0, packed >> 4, packed & 0xF).to(tl.int32)
    w = tl.load(code_ptr + nib)
    if ROW_ABSMAX:
        # N % BLOCKSIZE == 0 and BLOCKSIZE % BLOCK_N == 0: each tile row sits in one block.
        am = _absmax_f32(
            absmax_ptr,
            (rm * N + pid_n * BLOCK_N) // BLOCKSIZE,
            mask_m,
            code2_ptr,
            absmax2_ptr,
            offset_ptr,
            BLOCKSIZE2,
            NESTED,
        )
        w = w * am[:, None]
    else:
        am = _absmax_f32(
            absmax_ptr, flat // BLOCKSIZE, mask, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE2, NESTED
        )
        w = w * am

    out = w + delta
    tl.store(out_ptr + flat, _cast_out(out, OUT_KIND), mask=mask)
