"""The one-pass 4-bit round trips of ``fastsave merge`` against bitsandbytes' quantize + dequantize.

bitsandbytes is the oracle: every case compares the float32 bits of fastsave's round trips (the
torch one and the compiled C one) with ``quantize_4bit`` followed by ``dequantize_4bit`` (with the
same, possibly double-quantized, absmax), for both 4-bit types, every blocksize bitsandbytes
takes, the three load dtypes, and random, adversarial and real-shaped weights.
"""

from __future__ import annotations

import shutil

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from fastsave.sources import nf4_fused, nf4_native
from fastsave.sources.nf4_roundtrip import Nf4RoundTripSource, quantize_dequantize_float32
from fastsave.sources.settings_4bit import Quant4bitSettings

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))


def _implementation(name: str):
    """The round trip called ``name``; the compiled one must load wherever a C compiler exists."""
    if name == "torch":
        return nf4_fused.fused_round_trip
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: the compiled round trip cannot be built")
    assert nf4_native.available(), "a C compiler is here, but fastsave's kernels did not compile or load"
    return nf4_fused.compiled_round_trip


@pytest.fixture(params=["torch", "compiled"])
def implementation(request):
    return _implementation(request.param)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _adversarial(rows: int, cols: int, dtype: torch.dtype, quant_type: str, seed: int) -> torch.Tensor:
    """Random rows plus ties on every rounding boundary, zeros, subnormals and values near the dtype's max."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").float()
    ordered = torch.sort(code).values
    ties = torch.cat([(ordered[:-1] + ordered[1:]) / 2, ordered])
    ties = torch.cat([ties, -ties, torch.tensor([1.0])])
    flat = weight.reshape(-1)
    flat[: ties.numel()] = ties[: flat.numel()]  # absmax 1 in the first block: the values are the ties
    finfo = torch.finfo(dtype)
    weight[1 % rows] = 0.0
    weight[2 % rows, : cols // 2] = finfo.tiny / 4
    weight[3 % rows] = torch.randn(cols, generator=generator).clamp(-3, 3) * (finfo.max / 4)
    weight[4 % rows, ::3] = -0.0
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_equals_bitsandbytes(implementation, quant_type, blocksize, dtype):
    cols = max(blocksize, 256)
    rows = 8
    weight = _adversarial(rows, cols, dtype, quant_type, seed=blocksize)
    own = weight.float().reshape(-1, blocksize).abs().amax(1)
    # the block's own absmax, and the double-quantized one bitsandbytes decodes with
    quantized, state2 = bnb_functional.quantize_blockwise(own - own.mean(), blocksize=256)
    double = bnb_functional.dequantize_blockwise(quantized, state2) + own.mean()
    assert nf4_fused.fused_matches_bitsandbytes(quant_type, blocksize, dtype)
    for absmax in (None, own, double):  # None: each block's own, as without double quantization
        expected = nf4_fused.bitsandbytes_round_trip(weight, blocksize, quant_type, absmax)
        got = implementation(weight, blocksize, quant_type, absmax)
        assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_shaped_weight_streams_to_the_bits_of_one_bitsandbytes_call(quant_type):
    """A (1024, 2816) weight, its rows read in blocks, equals bitsandbytes' whole-tensor round trip."""
    from fastsave.sources.dense import DenseSource

    generator = torch.Generator().manual_seed(7)
    weight = (torch.randn(1024, 2816, generator=generator) * 0.02).to(torch.bfloat16)
    for double_quant in (True, False):
        settings = Quant4bitSettings(quant_type, 64, double_quant, torch.uint8)
        expected = quantize_dequantize_float32(weight, settings, torch.bfloat16, conv1d=False)
        source = Nf4RoundTripSource(DenseSource(weight), settings, torch.bfloat16, conv1d=False)
        reader = source.row_reader()
        got = torch.cat([reader.read(i, min(1024, i + 100)) for i in range(0, 1024, 100)])
        assert torch.equal(_bits(got), _bits(expected))


def _clear_choices() -> None:
    for cached in (
        nf4_fused.fused_matches_bitsandbytes,
        nf4_fused.compiled_matches_bitsandbytes,
        nf4_fused.chosen_round_trip,
    ):
        cached.cache_clear()


def _one_ulp_up(round_trip):
    def shifted(rows, blocksize, quant_type, absmax):
        return torch.nextafter(round_trip(rows, blocksize, quant_type, absmax), torch.tensor(float("inf")))

    return shifted


def test_a_bitsandbytes_that_rounds_otherwise_keeps_its_own_path(monkeypatch):
    """When neither one-pass round trip gives bitsandbytes' bits, bitsandbytes computes the round trip."""
    _clear_choices()
    shifted = _one_ulp_up(nf4_fused.bitsandbytes_round_trip)  # a bitsandbytes one ulp away
    monkeypatch.setattr(nf4_fused, "bitsandbytes_round_trip", shifted)
    try:
        assert not nf4_fused.fused_matches_bitsandbytes("nf4", 64, torch.bfloat16)
        assert not nf4_fused.compiled_matches_bitsandbytes("nf4", 64, torch.bfloat16)
        rows = torch.randn(4, 128).to(torch.bfloat16)
        absmax = rows.float().reshape(-1, 64).abs().amax(1)
        settings = Quant4bitSettings("nf4", 64, False, torch.uint8)
        assert torch.equal(nf4_fused.round_trip(rows, settings, absmax), shifted(rows, 64, "nf4", absmax))
    finally:
        _clear_choices()


def test_a_compiled_kernel_that_rounds_otherwise_is_not_used(monkeypatch):
    """The compiled round trip runs only where its probe gives bitsandbytes' bits; else the torch one."""
    _implementation("compiled")
    _clear_choices()
    monkeypatch.setattr(nf4_fused, "compiled_round_trip", _one_ulp_up(nf4_fused.compiled_round_trip))
    try:
        assert not nf4_fused.compiled_matches_bitsandbytes("nf4", 64, torch.bfloat16)
        assert nf4_fused.chosen_round_trip("nf4", 64, torch.bfloat16) is nf4_fused.fused_round_trip
    finally:
        monkeypatch.undo()
        _clear_choices()
    assert nf4_fused.chosen_round_trip("nf4", 64, torch.bfloat16) is nf4_fused.compiled_round_trip


def test_compiled_block_absmax_equals_torch_on_every_half_and_bfloat16_value():
    """Each of the 65536 bit patterns of float16 and bfloat16 (zeros, subnormals, infinities, NaNs) as
    a block of one, and in blocks of 64: the max |x| torch computes in float32 (NaN where one is)."""
    _implementation("compiled")
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        values = patterns.view(dtype)
        for blocksize in (1, 64):
            expected = values.float().abs().reshape(-1, blocksize).amax(1)
            got = nf4_native.block_absmax(values, blocksize)
            assert torch.equal(torch.isnan(got), torch.isnan(expected))
            finite = ~torch.isnan(expected)
            assert torch.equal(_bits(got[finite]), _bits(expected[finite]))


def test_compiled_round_trip_is_the_same_on_any_number_of_threads():
    """Blocks split among threads (more threads than blocks too) give the one-thread bits."""
    _implementation("compiled")
    weight = (torch.randn(37, 512, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 400):
            torch.set_num_threads(count)
            results.append(nf4_fused.compiled_round_trip(weight, 64, "nf4", None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(_bits(r), _bits(results[0])) for r in results)
    assert torch.equal(_bits(results[0]), _bits(nf4_fused.bitsandbytes_round_trip(weight, 64, "nf4", None)))


def test_compiled_kernel_refuses_values_that_are_not_whole_blocks():
    _implementation("compiled")
    with pytest.raises(ValueError, match="not whole blocks"):
        nf4_native.block_absmax(torch.ones(100), 64)
    with pytest.raises(ValueError, match="absmax values"):
        nf4_fused.compiled_round_trip(torch.ones(128), 64, "nf4", torch.ones(3))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_on_both_sides_of_every_boundary_inside_its_cell(implementation, quant_type):
    """The lookup by the top 16 bits compares with the boundary only in the cell it falls in: every
    float32 from that cell's first to its last, on both sides of the boundary, against bitsandbytes."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").float()
    ordered = torch.sort(code).values
    boundaries = (ordered[:-1] + ordered[1:]) / 2
    values = []
    for boundary in torch.cat([boundaries, -boundaries]):
        bits = int(boundary.view(torch.int32)) & ~0xFFFF  # the cell: the boundary's top 16 bits
        cell = torch.arange(0, 0x10000, 0x101, dtype=torch.int64) | bits
        near = boundary.view(torch.int32) + torch.arange(-3, 4, dtype=torch.int32)
        values += [cell.to(torch.int32).view(torch.float32), near.view(torch.float32)]
    values = torch.cat(values)
    values = values[(values.abs() <= 1) & torch.isfinite(values)]
    blocksize = 64
    rows = torch.cat([values, torch.zeros(-values.numel() % (blocksize - 1))]).view(-1, blocksize - 1)
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], 1).reshape(1, -1)  # each block's absmax is 1
    expected = nf4_fused.bitsandbytes_round_trip(rows, blocksize, quant_type, None)
    got = implementation(rows, blocksize, quant_type, None)
    assert torch.equal(_bits(got), _bits(expected))
    tables = nf4_fused._cell_tables(quant_type)
    low_bits = [int(b.view(torch.int32)) & 0xFFFF for b in boundaries]
    at_the_cells_top = sum(
        bits == (0 if b < 0 else 0xFFFF) for b, bits in zip(boundaries, low_bits, strict=True)
    )
    # a cell per boundary, unless the boundary is its cell's largest value (FP4's -0.0859375)
    assert int(torch.isnan(tables.value).sum()) == boundaries.numel() - at_the_cells_top


def test_compiled_round_trip_on_torchs_openmp_workers_and_on_threads_of_its_own():
    """The kernels split blocks among the workers of torch's OpenMP runtime (found in this process),
    or, without it, among pthreads of their own: the same bits either way."""
    _implementation("compiled")
    library = nf4_native._library()
    uses_openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    runtime = nf4_native._torch_openmp()
    assert (runtime is not None) == uses_openmp
    weight = (torch.randn(300, 1024, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.float16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        shared = nf4_fused.compiled_round_trip(weight, 64, "fp4", None)
        nf4_native._attach_openmp(library, None)  # back to threads of its own
        try:
            own = nf4_fused.compiled_round_trip(weight, 64, "fp4", None)
        finally:
            nf4_native._attach_openmp(library, runtime)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(shared), _bits(own))
    assert torch.equal(_bits(own), _bits(nf4_fused.bitsandbytes_round_trip(weight, 64, "fp4", None)))


def test_compiled_round_trip_with_a_table_of_other_than_16_codes():
    """The loop for tables other than NF4's and FP4's 16 codes (a generic decode beside the unrolled
    one), against the same float32 operations in torch: scale, clamp, count the boundaries below."""
    _implementation("compiled")
    codes = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0])
    boundaries = (codes[:-1] + codes[1:]) / 2
    rows = (torch.randn(6, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    values = rows.float().reshape(-1, 64)
    own = values.abs().amax(1)
    scaled = torch.clamp(values * (1.0 / own.clamp(min=1e-38)).view(-1, 1), -1, 1)
    index = (scaled.unsqueeze(-1) > boundaries).sum(-1)
    expected = (codes[index] * own.view(-1, 1)).reshape(rows.shape)
    got = nf4_native.round_trip(rows, 64, boundaries, codes, None)
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_with_the_merge_in_one_pass(quant_type, blocksize, dtype, out_dtype):
    """The round trip and the merge in one C pass (``fastsave merge``'s rows) against bitsandbytes'
    quantize + dequantize, then a product times the scaling, the add and one rounding in torch."""
    _implementation("compiled")
    cols = max(blocksize, 256)
    weight = _adversarial(8, cols, dtype, quant_type, seed=blocksize + 1)
    own = weight.float().reshape(-1, blocksize).abs().amax(1)
    quantized, state2 = bnb_functional.quantize_blockwise(own - own.mean(), blocksize=256)
    double = bnb_functional.dequantize_blockwise(quantized, state2) + own.mean()
    product = torch.randn(8, cols, generator=torch.Generator().manual_seed(3)) * 0.01
    boundaries, ordered = nf4_fused._tables(quant_type)
    assert nf4_fused.compiled_merge_matches(quant_type, blocksize, dtype)
    view = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    for absmax in (None, double):
        decoded = nf4_fused.bitsandbytes_round_trip(weight, blocksize, quant_type, absmax)
        for delta in (product, None):
            expected = (decoded + delta * 0.37 if delta is not None else decoded).to(out_dtype)
            got = torch.empty(8, cols, dtype=out_dtype)
            nonfinite = nf4_native.round_trip_merge(
                weight, blocksize, boundaries, ordered, absmax, delta, 0.37, got
            )
            # NaN where torch has NaN (torch's own NaN bits vary with its code path; a NaN fails
            # the save before anything is published), every other value to the bit
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(got), nan)
            assert torch.equal(got.view(view)[~nan], expected.view(view)[~nan])
            assert nonfinite == int((~torch.isfinite(expected)).sum())


def test_a_merge_pass_that_rounds_otherwise_is_not_used(monkeypatch, tmp_path):
    """The round trip's one-pass merge serves ``fastsave merge`` only where its probe gives the bits
    of the round trip followed by the torch merge."""
    from fastsave.sources.nf4_roundtrip import Nf4RoundTripSource

    _implementation("compiled")
    real = nf4_native.round_trip_merge

    def one_ulp_up(*args):
        nonfinite = real(*args)
        out = args[-1]
        out.view(torch.int16 if out.dtype == torch.bfloat16 else torch.int32).add_(1)
        return nonfinite

    nf4_fused.merge_pass_matches.cache_clear()
    monkeypatch.setattr(nf4_native, "round_trip_merge", one_ulp_up)
    try:
        assert not nf4_fused.compiled_merge_matches("nf4", 64, torch.bfloat16)
        source = Nf4RoundTripSource.__new__(Nf4RoundTripSource)
        source.quant_settings = Quant4bitSettings("nf4", 64, True)
        source.load_dtype = torch.bfloat16
        assert not source._merges_in_one_pass()
    finally:
        monkeypatch.undo()
        nf4_fused.merge_pass_matches.cache_clear()
    assert nf4_fused.compiled_merge_matches("nf4", 64, torch.bfloat16)
