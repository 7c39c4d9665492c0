"""Compile the kernels ahead of time for an NVIDIA target and count PTX instructions (no GPU needed).

Used by ``benchmarks/kernel_speed.py --ptx`` and the tests to check, on a machine without a GPU, what the
interpreter cannot show: that the compiled kernels never contract a multiply and an add into an FMA
outside the rank-r dot (every float32 ``mul``/``add`` is ``.rn``), and that loads/stores vectorize.
Needs triton's NVIDIA backend (ptxas ships with triton) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import collections
import re
from typing import Any

_POINTERS_DQ = ("q_ptr", "absmax_ptr", "code_ptr", "code2_ptr", "absmax2_ptr", "offset_ptr", "out_ptr")
_OUT_TY = {0: "*fp32", 1: "*fp16", 2: "*bf16"}
_PTX_OPS = re.compile(
    r"((?:ld|st)\.(?:global|shared)[a-z0-9.]*|fma\.[a-z0-9.]*f32|mul\.[a-z.]*f32|add\.[a-z.]*f32|cvt\.[a-z0-9.]+)"
)


def _compile(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    div16: list[str],
    arch: int,
    num_warps: int,
) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": False}
    )


def ptx_stats(
    kind: str, arch: int = 90, out_kind: int = 2, nested: bool = True, blocksize: int = 64
) -> dict[str, Any]:
    """Instruction counts of one compiled kernel, as launched for a large, 16-aligned weight.

    Args:
        kind: "dequant" or "merge".
        arch: SM version (75, 80, 86, 89, 90, ...).
        out_kind: 0 float32, 1 float16, 2 bfloat16.
        nested: double-quantized absmax.
        blocksize: quantization blocksize.

    Returns:
        ``{"ops": {ptx_op: count}, "threads": n, "tile": elements per program, "dot_fmas": n}``
        (``dot_fmas``: the FMAs one thread of the rank-16 dot needs; 0 for "dequant").
    """
    from . import _api
    from . import _triton_kernels as tk

    if tk.INTERPRETED:
        raise RuntimeError("ptx_stats needs compiled kernels: unset TRITON_INTERPRET before importing them")
    if kind == "dequant":
        cols = min(blocksize, _api._DEQUANT_TILE)
        consts = dict(
            BLOCKSIZE=blocksize,
            BLOCKSIZE2=256,
            NESTED=nested,
            ROWS=_api._DEQUANT_TILE // cols,
            COLS=cols,
            OUT_KIND=out_kind,
        )
        sig = {name: "*u8" if name in ("q_ptr",) else "*fp32" for name in _POINTERS_DQ}
        sig["absmax_ptr"] = "*u8" if nested else "*fp32"
        sig["out_ptr"] = _OUT_TY[out_kind]
        sig.update(n="i32", nbytes="i32")
        warps, tile, dot_fmas = 4, _api._DEQUANT_TILE, 0
        k = _compile(tk.dequant4_kernel, sig, consts, [*_POINTERS_DQ, "n", "nbytes"], arch, warps)
    elif kind == "merge":
        block_m, block_n, block_r, warps = _api._merge_tiles(blocksize, row_absmax=True, cuda=True)
        consts = dict(
            BLOCKSIZE=blocksize,
            BLOCKSIZE2=256,
            NESTED=nested,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            EVEN_N=True,
            ROW_ABSMAX=True,
            OUT_KIND=out_kind,
            stride_an=1,
            stride_br=1,
        )
        pointers = [*_POINTERS_DQ[:-1], "a_ptr", "b_ptr", "out_ptr"]
        sig = {name: "*fp32" for name in pointers}
        sig["q_ptr"] = "*u8"
        sig["absmax_ptr"] = "*u8" if nested else "*fp32"
        sig["out_ptr"] = _OUT_TY[out_kind]
        sig.update(
            M="i32",
            N="i32",
            N_half="i32",
            R="i32",
            stride_ar="i32",
            stride_an="i32",
            stride_bm="i32",
            stride_br="i32",
            scaling="fp32",
        )
        div = [*pointers, "M", "N", "N_half", "R", "stride_ar", "stride_bm"]
        k = _compile(tk.merge4_kernel, sig, consts, div, arch, warps)
        tile = block_m * block_n
        dot_fmas = tile * block_r // (warps * 32)
    else:
        raise ValueError(f"kind must be 'dequant' or 'merge', got {kind!r}")
    ops = collections.Counter(_PTX_OPS.findall(k.asm["ptx"]))
    return {"ops": dict(sorted(ops.items())), "threads": warps * 32, "tile": tile, "dot_fmas": dot_fmas}
