"""The 4-bit round trip of a block of rows in one pass: quantize and dequantize without packing.

``fastsave merge`` rebuilds the weights QLoRA training saw by quantizing the 16-bit base to NF4 /
FP4 and dequantizing it again. bitsandbytes does that in two calls per row block: quantize (scale
by the block's absmax, round to the nearest code, pack two codes a byte) and dequantize (unpack,
look the code up, multiply by the possibly double-quantized absmax). The codes in between are
never needed: this module computes the same thing in one pass over the block while it is in
cache, with the same float32 operations, and no packing.

It is only used where it gives bitsandbytes' bits: the first time a (quant_type, blocksize, dtype)
is met, both are run on a probe of adversarial values (ties on every rounding boundary, zeros,
subnormals, huge and tiny blocks) and compared; a bitsandbytes whose arithmetic differs (another
release, another backend) keeps its own path, and the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from fastsave.dtypes import same_bits
from fastsave.sources import nf4_native
from fastsave.sources.bnb import bnb_functional
from fastsave.sources.settings_4bit import Quant4bitSettings

logger = logging.getLogger(__name__)


@cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rounding boundaries between the sorted codes, the code values in sorted order)."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").to(torch.float32)
    ordered = code[torch.argsort(code)]  # bitsandbytes' own order (FP4 holds 0.0 and -0.0)
    return (ordered[:-1] + ordered[1:]) / 2, ordered


@dataclass(frozen=True)
class _CellTables:
    """The nearest code of every float32 by its top 16 bits (its "cell": sign, exponent, 7 bits of
    mantissa). In all but the few cells a rounding boundary falls in, every value of the cell has
    the same nearest code: ``value`` holds it. Where a boundary falls inside, ``value`` is NaN and
    ``boundary``, ``below`` and ``above`` say which code a value gets on each side of it."""

    value: torch.Tensor
    boundary: torch.Tensor
    below: torch.Tensor
    above: torch.Tensor


def _nearest_count(values: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """How many boundaries lie strictly below each value: the index of its nearest code in sorted
    order, as bitsandbytes' bucketize finds it (NaN: 0)."""
    return (values.view(-1, 1) > boundaries.view(1, -1)).sum(1)


@cache
def _cell_tables(quant_type: str) -> _CellTables | None:
    """The tables of :class:`_CellTables`; None if a cell held two boundaries (never for NF4 or FP4)."""
    boundaries, ordered = _tables(quant_type)
    top = torch.arange(65536, dtype=torch.int32) << 16
    first, last = top.view(torch.float32), (top | 0xFFFF).view(torch.float32)
    low, high = torch.minimum(first, last), torch.maximum(first, last)  # the cell's ends, in value order
    below, above = _nearest_count(low, boundaries), _nearest_count(high, boundaries)
    if bool((above - below > 1).any()):
        return None
    inside = above > below  # a boundary b falls in the cell: values up to b get `below`, beyond it `above`
    value = torch.where(inside, torch.tensor(float("nan")), ordered[below])
    boundary = torch.where(
        inside, boundaries[below.clamp(max=boundaries.numel() - 1)], torch.tensor(float("inf"))
    )
    return _CellTables(value.contiguous(), boundary, ordered[below], ordered[above])


def fused_round_trip(
    rows: torch.Tensor, blocksize: int, quant_type: str, absmax: torch.Tensor | None
) -> torch.Tensor:
    """Dequantized float32 values of ``rows`` (already in the dtype the model was loaded in).

    ``absmax``: the absmax each block is dequantized with when it is not the block's own (the
    double-quantized one); the rounding uses the block's own absmax, as quantizing does.

    The nearest code is looked up by the scaled value's top 16 bits (one gather), and compared with
    the boundary only where one falls inside that cell (about 0.3% of normally distributed weights):
    2.2x faster on the CPU than 15 vectorized comparisons, which were 3x faster than
    torch.bucketize's binary search per element. FP4's codes are not sorted, but the code
    bitsandbytes stores maps back to the same value.
    """
    tables = _cell_tables(quant_type)
    values = rows.reshape(-1, blocksize).float()
    own = values.abs().amax(1)
    scaled = torch.clamp(values * (1.0 / own.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    cell = (scaled.view(torch.int32) >> 16) & 0xFFFF
    codes = tables.value.index_select(0, cell)
    straddling = torch.isnan(codes).nonzero().squeeze(1)
    if straddling.numel():
        near = cell.index_select(0, straddling)
        beyond = scaled.index_select(0, straddling) > tables.boundary.index_select(0, near)
        exact = torch.where(beyond, tables.above.index_select(0, near), tables.below.index_select(0, near))
        codes.index_copy_(0, straddling, exact)
    codes = codes.view(-1, blocksize)
    return (codes * (own if absmax is None else absmax).view(-1, 1)).reshape(rows.shape)


def bitsandbytes_round_trip(
    rows: torch.Tensor, blocksize: int, quant_type: str, absmax: torch.Tensor | None
) -> torch.Tensor:
    """The same with bitsandbytes' quantize_4bit and dequantize_4bit."""
    codes, state = bnb_functional.quantize_4bit(
        rows, blocksize=blocksize, compress_statistics=False, quant_type=quant_type
    )
    if absmax is not None:
        state.absmax = absmax
    state.dtype = torch.float32
    return bnb_functional.dequantize_4bit(codes, state)


def _probe(blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that hit every boundary case of the rounding, in ``dtype``."""
    boundaries, ordered = _tables("nf4")
    fp4_boundaries, fp4_ordered = _tables("fp4")
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(blocksize, generator=generator) for _ in range(4)]
    for edges in (boundaries, ordered, fp4_boundaries, fp4_ordered):
        ties = torch.cat([edges, -edges, torch.tensor([1.0])])  # the block's absmax is 1: values are the ties
        blocks.append(torch.nn.functional.pad(ties[:blocksize], (0, max(0, blocksize - ties.numel()))))
    finfo = torch.finfo(dtype)
    blocks.append(torch.zeros(blocksize))
    blocks.append(torch.full((blocksize,), finfo.tiny / 4))  # subnormal
    blocks.append(torch.randn(blocksize, generator=generator).clamp(-3, 3) * (finfo.max / 4))
    blocks.append(torch.randn(blocksize, generator=generator) * (finfo.tiny * 64))
    probe = torch.stack(blocks).to(dtype)  # finite: non-finite weights are refused by the writer anyway
    return probe.reshape(-1, blocksize * 2)  # 12 blocks, two a row: rows span several blocks


# (rows, blocksize, quant_type, absmax) -> float32 values, as bitsandbytes_round_trip
RoundTrip = Callable[[torch.Tensor, int, str, "torch.Tensor | None"], torch.Tensor]


def compiled_round_trip(
    rows: torch.Tensor,
    blocksize: int,
    quant_type: str,
    absmax: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same in one C loop (fastsave.sources.nf4_native), into ``out`` when given; needs
    ``nf4_native.available()``."""
    boundaries, ordered = _tables(quant_type)
    return nf4_native.round_trip(rows, blocksize, boundaries, ordered, absmax, out)


def _matches_bitsandbytes(
    implementation: RoundTrip, quant_type: str, blocksize: int, dtype: torch.dtype
) -> bool:
    rows = _probe(blocksize, dtype)
    own = rows.float().reshape(-1, blocksize).abs().amax(1)
    for absmax in (None, own * 1.0078125 + 1e-3):  # its own absmax and a double-quantized-like one
        expected = bitsandbytes_round_trip(rows, blocksize, quant_type, absmax)
        got = implementation(rows, blocksize, quant_type, absmax)
        if not same_bits(got, expected):
            return False
    return True


@cache
def fused_matches_bitsandbytes(quant_type: str, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_round_trip` gives bitsandbytes' bits here (checked once, on the probe)."""
    return _cell_tables(quant_type) is not None and _matches_bitsandbytes(
        fused_round_trip, quant_type, blocksize, dtype
    )


@cache
def compiled_matches_bitsandbytes(quant_type: str, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether :func:`compiled_round_trip` can run here and gives bitsandbytes' bits (checked once,
    on the probe)."""
    return nf4_native.available() and _matches_bitsandbytes(compiled_round_trip, quant_type, blocksize, dtype)


@cache
def chosen_round_trip(quant_type: str, blocksize: int, dtype: torch.dtype) -> RoundTrip:
    """The fastest round trip that gives bitsandbytes' bits on the probe for these settings: the
    compiled one, the torch one, else bitsandbytes' quantize + dequantize (the log says so once)."""
    if compiled_matches_bitsandbytes(quant_type, blocksize, dtype):
        return compiled_round_trip
    if nf4_native.available():  # compiled, but other bits than bitsandbytes': worth knowing
        logger.info(
            "fastsave: its compiled round trip does not give this bitsandbytes' bits for %s (blocksize %d, "
            "%s); using the torch one",
            quant_type,
            blocksize,
            dtype,
        )
    if fused_matches_bitsandbytes(quant_type, blocksize, dtype):
        return fused_round_trip
    logger.info(
        "fastsave: this bitsandbytes rounds %s (blocksize %d) differently from fastsave's one-pass round "
        "trip; using bitsandbytes' quantize + dequantize",
        quant_type,
        blocksize,
    )
    return bitsandbytes_round_trip


def round_trip(
    rows: torch.Tensor,
    settings: Quant4bitSettings,
    absmax: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 round trip of ``rows`` (the load dtype) by :func:`chosen_round_trip`; ``absmax``:
    the double-quantized absmax of its blocks (None: each block's own). Written into ``out`` (a
    float32 tensor of ``rows``' shape) by the compiled round trip, when given; the others return a
    new tensor."""
    implementation = chosen_round_trip(settings.quant_type, settings.blocksize, rows.dtype)
    if implementation is compiled_round_trip:
        return compiled_round_trip(rows, settings.blocksize, settings.quant_type, absmax, out)
    return implementation(rows, settings.blocksize, settings.quant_type, absmax)


def block_absmax(rows: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each block of ``blocksize`` consecutive values of ``rows``, in float32 (exact in
    any precision: no rounding). One C pass where the kernels are available."""
    if nf4_native.available():
        return nf4_native.block_absmax(rows, blocksize)
    return rows.abs().reshape(-1, blocksize).amax(1).to(torch.float32)


def compiled_merge_matches(quant_type: str, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether the compiled round trip with the merge in the same pass (nf4_native.round_trip_merge)
    serves these settings: the compiled round trip itself does (:func:`compiled_matches_bitsandbytes`)
    and the pass gives the bits of that round trip followed by the torch merge (a product times a
    scaling, the add, one rounding), for bfloat16 and float32 output, on the probe."""
    return compiled_matches_bitsandbytes(quant_type, blocksize, dtype) and merge_pass_matches(
        quant_type, blocksize, dtype
    )


@cache
def merge_pass_matches(quant_type: str, blocksize: int, dtype: torch.dtype) -> bool:
    """The second half of :func:`compiled_merge_matches`, checked once per setting."""
    rows = _probe(blocksize, dtype)
    generator = torch.Generator().manual_seed(2)
    product = torch.randn(rows.shape, generator=generator) * 0.01
    boundaries, ordered = _tables(quant_type)
    for absmax in (None, rows.float().reshape(-1, blocksize).abs().amax(1) * 1.0078125 + 1e-3):
        decoded = compiled_round_trip(rows, blocksize, quant_type, absmax)
        for out_dtype, delta in ((torch.bfloat16, product), (torch.float32, None)):
            expected = (decoded + delta * 0.7 if delta is not None else decoded).to(out_dtype)
            got = torch.empty(rows.shape, dtype=out_dtype)
            nf4_native.round_trip_merge(rows, blocksize, boundaries, ordered, absmax, delta, 0.7, got)
            view = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
            # NaN bits aside (torch's vary with its code path; a NaN fails any save), every bit
            nan = torch.isnan(expected)
            if not torch.equal(torch.isnan(got), nan) or not torch.equal(
                got.view(view)[~nan], expected.view(view)[~nan]
            ):
                return False
    return True


def round_trip_merge(
    rows: torch.Tensor,
    settings: Quant4bitSettings,
    absmax: torch.Tensor | None,
    product: torch.Tensor | None,
    scaling: float,
    out: torch.Tensor,
) -> int:
    """The round trip of ``rows`` plus ``product`` times ``scaling``, rounded into ``out``, in one
    compiled pass (only where :func:`compiled_merge_matches`); NaN/Inf written."""
    boundaries, ordered = _tables(settings.quant_type)
    return nf4_native.round_trip_merge(
        rows, settings.blocksize, boundaries, ordered, absmax, product, scaling, out
    )
