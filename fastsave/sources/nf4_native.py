"""The C loops of fastsave/native/codes_4bit.c: the 4-bit round trip, the blocks' absmax, a row
block of a bitsandbytes 4-bit weight dequantized, merged with a LoRA product and rounded, and the
same merge of a row block of a 16-bit or float32 weight.

The torch form of the round trip (fastsave.sources.nf4_fused) makes about ten passes over a row
block's memory (a copy to float32, the absolute values, the scaled values, their bits, the
looked-up codes, the product...); the C loop reads each 16-bit value once and writes its float32
result once, and splits the blocks among torch's number of threads. Same float32 operations in
the same order; nf4_fused still checks it against bitsandbytes on its probe before using it.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from fastsave.native import load_library

# the kernel's dtype codes
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@cache
def _library() -> ctypes.CDLL | None:
    library = load_library("codes_4bit")
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.fastsave_round_trip_4bit.argtypes = [
        pointer,  # source values
        ctypes.c_int,  # their dtype
        size,  # blocks
        size,  # blocksize
        pointer,  # boundaries (n_codes - 1, ascending)
        pointer,  # codes (ascending)
        ctypes.c_int,  # n_codes
        pointer,  # absmax to decode with, or NULL
        pointer,  # float32 out
        ctypes.c_int,  # threads
    ]
    library.fastsave_round_trip_4bit.restype = ctypes.c_int
    library.fastsave_block_absmax.argtypes = [pointer, ctypes.c_int, size, size, pointer, ctypes.c_int]
    library.fastsave_block_absmax.restype = ctypes.c_int
    # what the merges share: the 4-bit codes (checked by _codes_arguments), the output (the tail of _merge_arguments)
    packed_codes = [
        pointer,  # packed codes
        size,  # blocks
        size,  # blocksize
        pointer,  # the 16 code values
        pointer,  # float32 absmax, one per block
    ]
    merged_out = [
        ctypes.c_float,  # scaling
        ctypes.c_int,  # output dtype
        pointer,  # output values
        ctypes.c_int,  # threads
    ]
    library.fastsave_merge_4bit.argtypes = [
        *packed_codes,
        pointer,  # float32 product B @ A of these rows, or NULL
        *merged_out,
    ]
    library.fastsave_merge_4bit.restype = ctypes.c_int64
    library.fastsave_merge_4bit_factors.argtypes = [
        *packed_codes,
        pointer,  # float32 B of these rows (rows x rank)
        pointer,  # float32 A (rank x columns)
        size,  # rank
        size,  # columns
        *merged_out,
    ]
    library.fastsave_merge_4bit_factors.restype = ctypes.c_int64
    library.fastsave_lora_product_mismatches.argtypes = [
        pointer,  # float32 B (rows x rank)
        pointer,  # float32 A (rank x columns)
        size,  # rows
        size,  # rank
        size,  # columns
        pointer,  # float32 reference product (rows x columns)
        ctypes.c_int,  # threads
    ]
    library.fastsave_lora_product_mismatches.restype = ctypes.c_int64
    library.fastsave_factors_fast.argtypes = []
    library.fastsave_factors_fast.restype = ctypes.c_int
    library.fastsave_round_trip_merge_4bit.argtypes = [
        pointer,  # source values
        ctypes.c_int,  # their dtype
        size,  # blocks
        size,  # blocksize
        pointer,  # boundaries
        pointer,  # codes
        ctypes.c_int,  # n_codes
        pointer,  # absmax to decode with, or NULL
        pointer,  # float32 product, or NULL
        *merged_out,
    ]
    library.fastsave_round_trip_merge_4bit.restype = ctypes.c_int64
    library.fastsave_merge_dense.argtypes = [
        pointer,  # source values
        ctypes.c_int,  # their dtype
        size,  # rows
        size,  # columns
        pointer,  # float32 product, or NULL
        *merged_out,
    ]
    library.fastsave_merge_dense.restype = ctypes.c_int64
    library.fastsave_force_decode.argtypes = [ctypes.c_int]
    library.fastsave_force_decode.restype = ctypes.c_int
    library.fastsave_use_openmp.argtypes = [pointer]
    library.fastsave_use_openmp.restype = None
    _attach_openmp(library, _torch_openmp())
    return library


def _attach_openmp(library: ctypes.CDLL, runtime: ctypes.CDLL | None) -> None:
    """Have the kernels split their work among ``runtime``'s OpenMP workers (None: threads of their own)."""
    library.fastsave_use_openmp(
        None if runtime is None else ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p)
    )


def _torch_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its parallel operations on, as loaded in this process (None: torch
    does not use OpenMP, or it cannot be found). The kernels split their blocks among its workers,
    which spin a while after each torch operation: threads of their own would compete with them for
    the cores (profiled on 2 cores with two pthreads of its own: a quarter of the round trip's CPU
    samples were libgomp's workers spinning)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: the kernels start threads of their own
        return None
    torch_lib = str(Path(torch.__file__).parent)
    found = set(re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)", maps))
    for path in sorted(found, key=lambda p: not p.startswith(torch_lib)):  # torch's own first
        try:
            runtime = ctypes.CDLL(path)  # already loaded: the same handle, nothing loaded anew
        except OSError:
            continue
        if hasattr(runtime, "GOMP_parallel"):
            return runtime
    return None


def available() -> bool:
    """Whether the compiled kernels could be loaded here (fastsave.native)."""
    return _library() is not None


def _kernel_input(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` as the kernel reads them: contiguous, on the CPU, float32 or 16-bit."""
    if rows.dtype not in _DTYPES:
        rows = rows.float()
    return rows.contiguous()


def _blocks(source: torch.Tensor, blocksize: int) -> int:
    if blocksize < 1 or source.numel() % blocksize:
        raise ValueError(f"{source.numel()} values are not whole blocks of {blocksize}")
    return source.numel() // blocksize


def _check(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(f"fastsave's C kernel refused the arguments of {what}")


@dataclass
class _RoundTripInputs:
    """The round trip's inputs as the kernel reads them (held here while it runs), checked against
    each other: the rows, their block count, the float32 boundaries, codes and optional absmax."""

    source: torch.Tensor
    n_blocks: int
    blocksize: int
    boundaries: torch.Tensor
    codes: torch.Tensor
    decode: torch.Tensor | None

    def leading_arguments(self) -> tuple:
        """The kernel's first eight arguments (source to absmax), the same for both round trips."""
        return (
            self.source.data_ptr(),
            _DTYPES[self.source.dtype],
            self.n_blocks,
            self.blocksize,
            self.boundaries.data_ptr(),
            self.codes.data_ptr(),
            self.codes.numel(),
            None if self.decode is None else self.decode.data_ptr(),
        )


def _round_trip_inputs(
    rows: torch.Tensor,
    blocksize: int,
    boundaries: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
) -> _RoundTripInputs:
    source = _kernel_input(rows)
    n_blocks = _blocks(source, blocksize)
    decode = None if absmax is None else absmax.to(torch.float32).contiguous()
    if decode is not None and decode.numel() != n_blocks:
        raise ValueError(f"{decode.numel()} absmax values for {n_blocks} blocks")
    return _RoundTripInputs(
        source,
        n_blocks,
        blocksize,
        boundaries.to(torch.float32).contiguous(),
        codes.to(torch.float32).contiguous(),
        decode,
    )


def round_trip(
    rows: torch.Tensor,
    blocksize: int,
    boundaries: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantized float32 values of ``rows`` quantized to the nearest of ``codes`` (ascending;
    ``boundaries`` between them), per block of ``blocksize``; decoded with ``absmax`` (float32, a
    value per block) when given, else each block's own. Written into ``out`` (a contiguous float32
    tensor of ``rows``' shape) when given, else a new tensor. Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled round trip is not available here (see available())")
    inputs = _round_trip_inputs(rows, blocksize, boundaries, codes, absmax)
    if out is None:
        out = torch.empty(rows.shape, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != rows.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(rows.shape)}")
    status = library.fastsave_round_trip_4bit(
        *inputs.leading_arguments(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    _check(status, "round_trip")
    return out


def block_absmax(rows: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each block of ``blocksize`` consecutive values of ``rows``, float32 (exact; NaN
    where a block holds one). Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled block absmax is not available here (see available())")
    source = _kernel_input(rows)
    n_blocks = _blocks(source, blocksize)
    out = torch.empty(n_blocks, dtype=torch.float32)
    status = library.fastsave_block_absmax(
        source.data_ptr(), _DTYPES[source.dtype], n_blocks, blocksize, out.data_ptr(), torch.get_num_threads()
    )
    _check(status, "block_absmax")
    return out


# the output dtypes fastsave_merge_4bit writes (the kernel's codes)
MERGE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _merge_arguments(
    out: torch.Tensor, product: torch.Tensor | None, scaling: float, n: int
) -> tuple[int | None, float, int, int, int]:
    """The arguments every merge pass ends with (the product or NULL, the scaling, the output's
    dtype and values, the threads), once checked: ``n`` contiguous values each, the output float32
    or bfloat16, the product float32."""
    if out.dtype not in MERGE_DTYPES or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"out must be a contiguous float32 or bfloat16 tensor of {n} values")
    if product is not None and (
        product.dtype != torch.float32 or not product.is_contiguous() or product.numel() != n
    ):
        raise ValueError(f"product must be {n} contiguous float32 values")
    pointer = None if product is None else product.data_ptr()
    return pointer, scaling, MERGE_DTYPES[out.dtype], out.data_ptr(), torch.get_num_threads()


def _merged(count: int, name: str) -> int:
    """A pass's count: the NaN and infinities a merge wrote, or the values a product check found
    differing (-1: it refused its arguments)."""
    _check(0 if count >= 0 else -1, name)
    return int(count)


def _codes_arguments(
    packed: torch.Tensor, blocksize: int, codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor
) -> int:
    """The number of 4-bit blocks behind ``out``, once the packed codes (two a byte), the 16 code
    values and the per-block absmax are checked against it."""
    n = out.numel()
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.numel() * 2 != n:
        raise ValueError(f"{packed.numel()} packed bytes for {n} values")
    n_blocks = _blocks(out, blocksize)
    if absmax.dtype != torch.float32 or not absmax.is_contiguous() or absmax.numel() != n_blocks:
        raise ValueError(f"absmax must be {n_blocks} contiguous float32 values")
    if codes.dtype != torch.float32 or not codes.is_contiguous() or codes.numel() != 16:
        raise ValueError("codes must be 16 contiguous float32 values")
    return n_blocks


def merge_4bit(
    packed: torch.Tensor,
    blocksize: int,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    product: torch.Tensor | None,
    scaling: float,
    out: torch.Tensor,
) -> int:
    """``out`` = round(codes[nibble] * absmax[block] + product * float32(scaling)) in ``out``'s dtype
    (float32 or bfloat16), each float32 operation rounded on its own in that order; without
    ``product`` the dequantized values alone. ``packed``: uint8, two codes a byte (the first in the
    high nibble), ``out.numel() // 2`` bytes; ``absmax``: float32, one per block of ``blocksize``;
    ``product``: float32, ``out``'s shape. Returns how many NaN and infinities were written. Needs
    :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled 4-bit merge is not available here (see available())")
    n = out.numel()
    tail = _merge_arguments(out, product, scaling, n)
    n_blocks = _codes_arguments(packed, blocksize, codes, absmax, out)
    nonfinite = library.fastsave_merge_4bit(
        packed.data_ptr(), n_blocks, blocksize, codes.data_ptr(), absmax.data_ptr(), *tail
    )
    return _merged(nonfinite, "merge_4bit")


def factors_fast() -> bool:
    """Whether :func:`merge_4bit_factors` computes the LoRA product at vector speed here (AVX-512);
    elsewhere it is exact but slower than the BLAS's product. Needs :func:`available`."""
    library = _library()
    return library is not None and bool(library.fastsave_factors_fast())


def _factor_arguments(b: torch.Tensor, a: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """The pointers to ``b`` (``n_rows`` x rank) and ``a`` (rank x ``n_cols``) and the rank, once checked."""
    for name, factor in (("b", b), ("a", a)):
        if factor.dtype != torch.float32 or factor.dim() != 2 or not factor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-D float32 tensor")
    rank = int(a.shape[0])
    if tuple(b.shape) != (n_rows, rank) or int(a.shape[1]) != n_cols or rank < 1:
        raise ValueError(f"factors {tuple(b.shape)} @ {tuple(a.shape)} do not give {n_rows} x {n_cols}")
    return b.data_ptr(), a.data_ptr(), rank


def merge_4bit_factors(
    packed: torch.Tensor,
    blocksize: int,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
) -> int:
    """:func:`merge_4bit` with the product ``b @ a`` computed value by value in the pass (from +0.0,
    one fused multiply-add per rank, in rank order, as :func:`lora_product_mismatches` checks it),
    never held: ``out`` is 2-D (rows x columns), ``b`` its rows' float32 B (rows x rank), ``a``
    float32 A (rank x columns); ``blocksize`` a multiple of 16 that divides the columns. Returns how
    many NaN and infinities were written. Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled 4-bit merge is not available here (see available())")
    if out.dim() != 2:
        raise ValueError("out must be 2-D: rows x columns")
    n_rows, n_cols = (int(d) for d in out.shape)
    b_pointer, a_pointer, rank = _factor_arguments(b, a, n_rows, n_cols)
    _, scaling, out_dtype, out_pointer, threads = _merge_arguments(out, None, scaling, out.numel())
    n_blocks = _codes_arguments(packed, blocksize, codes, absmax, out)
    nonfinite = library.fastsave_merge_4bit_factors(
        packed.data_ptr(), n_blocks, blocksize, codes.data_ptr(), absmax.data_ptr(),
        b_pointer, a_pointer, rank, n_cols, scaling, out_dtype, out_pointer, threads,
    )  # fmt: skip
    return _merged(nonfinite, "merge_4bit_factors")


def lora_product_mismatches(b: torch.Tensor, a: torch.Tensor, reference: torch.Tensor) -> int:
    """How many values of ``b @ a`` as :func:`merge_4bit_factors` computes them (from +0.0, one fused
    multiply-add per rank, in rank order) differ in their bits from
    ``reference`` (contiguous float32 of the product's shape: the BLAS's product), computed and
    compared a row piece at a time, never held whole. ``b``, ``a``: float32, contiguous. Needs
    :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled LoRA product is not available here (see available())")
    n_rows, n_cols = int(b.shape[0]), int(a.shape[1])
    b_pointer, a_pointer, rank = _factor_arguments(b, a, n_rows, n_cols)
    if (
        reference.dtype != torch.float32
        or tuple(reference.shape) != (n_rows, n_cols)
        or not reference.is_contiguous()
        or reference.device.type != "cpu"
    ):
        raise ValueError(f"reference must be a contiguous float32 CPU tensor of shape {(n_rows, n_cols)}")
    differ = library.fastsave_lora_product_mismatches(
        b_pointer, a_pointer, n_rows, rank, n_cols, reference.data_ptr(), torch.get_num_threads()
    )
    return _merged(differ, "lora_product_mismatches")


def merge_dense(rows: torch.Tensor, product: torch.Tensor | None, scaling: float, out: torch.Tensor) -> int:
    """``out`` = round(float32(``rows``) + ``product`` * float32(``scaling``)) in ``out``'s dtype
    (float32 or bfloat16), one pass: the float32 operations and the one rounding of the row merge
    of a 16-bit weight (its rows as float32, peft's delta, the add, the cast). ``rows``: a 2-D
    float32, bfloat16 or float16 tensor on the CPU, contiguous; ``product``: float32, ``rows``'
    shape, or None. Returns how many NaN and infinities were written. Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled merge is not available here (see available())")
    if rows.dim() != 2 or rows.dtype not in _DTYPES or not rows.is_contiguous() or rows.device.type != "cpu":
        raise ValueError("rows must be a contiguous 2-D float32, bfloat16 or float16 CPU tensor")
    n_rows, n_cols = rows.shape
    tail = _merge_arguments(out, product, scaling, rows.numel())
    if n_cols == 0 or n_rows == 0:
        return 0
    nonfinite = library.fastsave_merge_dense(rows.data_ptr(), _DTYPES[rows.dtype], n_rows, n_cols, *tail)
    return _merged(nonfinite, "merge_dense")


def round_trip_merge(
    rows: torch.Tensor,
    blocksize: int,
    boundaries: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    product: torch.Tensor | None,
    scaling: float,
    out: torch.Tensor,
) -> int:
    """:func:`round_trip` of ``rows`` and the merge of :func:`merge_4bit` in one pass: ``out`` =
    round(round trip + product * float32(scaling)) in ``out``'s dtype (float32 or bfloat16); the
    float32 round trip never leaves the cache. Returns how many NaN and infinities were written.
    Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled round trip is not available here (see available())")
    inputs = _round_trip_inputs(rows, blocksize, boundaries, codes, absmax)
    n = inputs.source.numel()
    tail = _merge_arguments(out, product, scaling, n)
    nonfinite = library.fastsave_round_trip_merge_4bit(*inputs.leading_arguments(), *tail)
    return _merged(nonfinite, "round_trip_merge")


def force_decode(kind: str) -> bool:
    """Decode the merge's codes with one implementation ("plain", "avx2", "avx512"; "auto": by the
    CPU), for tests; False where this CPU cannot run it. Needs :func:`available`."""
    library = _library()
    if library is None:
        raise RuntimeError("fastsave's compiled 4-bit merge is not available here (see available())")
    which = {"auto": 0, "plain": 1, "avx2": 2, "avx512": 3}[kind]
    return library.fastsave_force_decode(which) == 0
