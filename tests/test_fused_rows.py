"""The one-pass C merge of a 4-bit row block (fastsave.merge.fused_rows) against bitsandbytes and torch.

The oracle of every case is bitsandbytes' own float32 dequantize of the same codes, plus the LoRA
product times the scaling and one rounding, as torch operations: the row merge's definition. Each
code decoder of the C loop (plain, AVX2, AVX-512) runs on its own wherever the CPU has it.
"""

from __future__ import annotations

import copy
import re
import shutil

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from checkpoint_files import saved_tensors
from test_core_merged import _lora_layers, _oracle

import fastsave
from fastsave.adapters.delta import LoraDelta
from fastsave.merge import fused_rows, row_blocks
from fastsave.merge.assemble import block_bytes
from fastsave.sources import bnb_4bit, nf4_fused, nf4_native
from fastsave.sources.bnb_4bit import absmax_float32

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine: the C loop cannot be built"),
]


@pytest.fixture(params=["plain", "avx2", "avx512"])
def decoder(request):
    """Each code decoder of the C loop in turn (x86-64 CPUs without AVX-512 cannot run that one)."""
    assert nf4_native.available(), "a C compiler is here, but fastsave's kernels did not compile or load"
    if not nf4_native.force_decode(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} decoder")
    yield request.param
    nf4_native.force_decode("auto")


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random rows with a zero row, a huge and a tiny row, and a row that reaches every code."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[0] = 0.0
    weight[1] *= 1e30
    weight[2] *= 1e-30
    weight[3] = torch.linspace(-1.0, 1.0, cols)
    return weight.to(torch.bfloat16)


def _reference(codes, state, product, scaling, dtype) -> torch.Tensor:
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    weight = bnb_functional.dequantize_4bit(codes, state32)
    if product is not None:
        weight = weight + product * scaling
    return weight.to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_delta", [True, False])
def test_merge_equals_bitsandbytes_and_torch(decoder, blocksize, quant_type, nested, dtype, with_delta):
    cols = max(2 * blocksize, 256) + 2 * blocksize  # several blocks a row, an odd number of 16s
    codes, state = bnb_functional.quantize_4bit(
        _weight(12, cols), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    generator = torch.Generator().manual_seed(1)
    product = (torch.randn(12, 16, generator=generator) @ torch.randn(16, cols, generator=generator)) * 0.01
    product = product if with_delta else None
    ours = torch.empty(12, cols, dtype=dtype)
    nonfinite = nf4_native.merge_4bit(
        codes.reshape(-1), blocksize, state.code.float(), absmax_float32(state), product, 0.37, ours
    )
    expected = _reference(codes, state, product, 0.37, dtype)
    assert torch.equal(_bits(ours), _bits(expected))
    assert nonfinite == 0


def test_nan_and_infinities_are_counted(decoder):
    codes, state = bnb_functional.quantize_4bit(_weight(4, 256), blocksize=64, quant_type="nf4")
    product = torch.zeros(4, 256)
    product[0, 3], product[1, 7], product[2, 9] = float("inf"), float("nan"), 3e38  # 3e38 * 10 overflows
    ours = torch.empty(4, 256, dtype=torch.bfloat16)
    nonfinite = nf4_native.merge_4bit(
        codes.reshape(-1), 64, state.code.float(), absmax_float32(state), product, 10.0, ours
    )
    expected = _reference(codes, state, product, 10.0, torch.bfloat16)
    assert nonfinite == int((~torch.isfinite(expected)).sum()) == 3
    # the same infinities and finite values; NaN where torch has NaN (its NaN bits vary with its code
    # path, and a NaN fails the save before anything is published)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(_bits(ours)[~nan], _bits(expected)[~nan])


def _on_threads(merge, shape: tuple[int, int]) -> list[torch.Tensor]:
    """``merge(out)`` into a fresh bfloat16 ``out`` with 1, 2 and 7 torch threads (restored after)."""
    outputs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            out = torch.empty(shape, dtype=torch.bfloat16)
            merge(out)
            outputs.append(out)
    finally:
        torch.set_num_threads(before)
    return outputs


def test_the_same_on_any_number_of_threads():
    codes, state = bnb_functional.quantize_4bit(_weight(64, 1024), blocksize=64, quant_type="nf4")
    product = torch.randn(64, 1024) * 0.01
    outputs = _on_threads(
        lambda out: nf4_native.merge_4bit(
            codes.reshape(-1), 64, state.code.float(), absmax_float32(state), product, 2.0, out
        ),
        (64, 1024),
    )
    assert all(torch.equal(_bits(o), _bits(outputs[0])) for o in outputs)
    assert torch.equal(_bits(outputs[0]), _bits(_reference(codes, state, product, 2.0, torch.bfloat16)))


def test_bad_arguments_are_refused():
    codes, state = bnb_functional.quantize_4bit(_weight(4, 256), blocksize=64, quant_type="nf4")
    absmax = absmax_float32(state)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        nf4_native.merge_4bit(
            codes.reshape(-1),
            64,
            state.code.float(),
            absmax,
            None,
            1.0,
            torch.empty(4, 256, dtype=torch.float16),
        )
    with pytest.raises(ValueError, match="packed bytes"):
        nf4_native.merge_4bit(
            codes.reshape(-1)[:10], 64, state.code.float(), absmax, None, 1.0, torch.empty(4, 256)
        )
    with pytest.raises(ValueError, match="absmax"):
        nf4_native.merge_4bit(
            codes.reshape(-1), 64, state.code.float(), absmax[:3], None, 1.0, torch.empty(4, 256)
        )


def _sequential_fma(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``b @ a`` as one float32 fused multiply-add per rank, in rank order, from +0.0: each step's
    product is exact in float64 (24 + 24 bits) and so is its sum with a float32 of a nearby
    exponent; rounded once to float32, as a fused multiply-add rounds. Independent of fastsave."""
    total = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32)
    for k in range(b.shape[1]):
        total = (b[:, k : k + 1].double() * a[k].double() + total.double()).float()
    return total


@pytest.mark.parametrize("shape", [(12, 16, 320), (13, 8, 1024), (5, 3, 40), (64, 16, 2048)])
def test_the_pass_product_is_a_fused_multiply_add_per_rank_in_order(decoder, shape):
    """The pass's product (what lora_product_mismatches compares) on every decoder's path: whole
    vectors, four rows at a time and leftovers, a width that is no multiple of 16 (the plain loop),
    and zeros whose sign comes from the order (a zero row of B against a negative A)."""
    rows, rank, cols = shape
    generator = torch.Generator().manual_seed(rows)
    b, a = torch.randn(rows, rank, generator=generator), torch.randn(rank, cols, generator=generator)
    b[1] = 0.0
    a[:, :8] = -a[:, :8].abs()
    # every value's bits are the sequential fused multiply-adds
    assert nf4_native.lora_product_mismatches(b, a, _sequential_fma(b, a)) == 0


@pytest.mark.parametrize("shape", [(12, 16, 320), (13, 8, 1024), (5, 3, 40), (70, 16, 2112)])
def test_the_product_check_counts_every_value_whose_bits_differ(decoder, shape):
    """lora_product_mismatches (the check of a shape, computing and comparing without holding the
    product) against an independent reference, the sequential fused multiply-adds: none differ;
    altered values are counted one by one wherever they are (first, last, either side of a row's
    first 1024 values, a zero turned into the zero of the other sign), on any number of threads."""
    rows, rank, cols = shape
    generator = torch.Generator().manual_seed(cols)
    b, a = torch.randn(rows, rank, generator=generator), torch.randn(rank, cols, generator=generator)
    b[1] = 0.0  # row 1 is all zeros
    reference = _sequential_fma(b, a)
    assert nf4_native.lora_product_mismatches(b, a, reference) == 0
    altered = reference.clone()
    flat = altered.view(-1).view(torch.int32)
    positions = {0, flat.numel() - 1, 1023 % flat.numel(), 1024 % flat.numel()} - {cols}
    for position in positions:
        flat[position] ^= 1
    altered[1, 0] = -altered[1, 0]  # flat position `cols`: a zero, equal as a number, not in bits
    expected = len(positions) + 1
    assert torch.ne(_bits(reference), _bits(altered)).sum().item() == expected
    counts = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            counts.append(nf4_native.lora_product_mismatches(b, a, altered))
    finally:
        torch.set_num_threads(before)
    assert counts == [expected] * 3


def test_the_product_check_refuses_what_it_cannot_compare():
    b, a = torch.randn(4, 8), torch.randn(8, 32)
    for reference in (torch.zeros(4, 31), torch.zeros(4, 32, dtype=torch.float64), torch.zeros(32, 4).t()):
        with pytest.raises(ValueError, match="reference"):
            nf4_native.lora_product_mismatches(b, a, reference)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_native.lora_product_mismatches(b, a.t().contiguous().t(), torch.zeros(4, 32))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [13, 16])
def test_merge_with_factors_equals_bitsandbytes_and_the_product(decoder, blocksize, dtype, rows):
    """merge_4bit_factors against bitsandbytes' dequantize plus the sequential product times the
    scaling, one rounding: rows in fours and a leftover, columns in 64s and a leftover 16s."""
    cols = 5 * 64 + 2 * max(blocksize, 16) if blocksize < 64 else 3 * blocksize
    codes, state = bnb_functional.quantize_4bit(_weight(rows, cols), blocksize=blocksize, quant_type="nf4")
    generator = torch.Generator().manual_seed(2)
    b, a = torch.randn(rows, 16, generator=generator) * 0.01, torch.randn(16, cols, generator=generator)
    ours = torch.empty(rows, cols, dtype=dtype)
    nonfinite = nf4_native.merge_4bit_factors(
        codes.reshape(-1), blocksize, state.code.float(), absmax_float32(state), b, a, 0.37, ours
    )
    expected = _reference(codes, state, _sequential_fma(b, a), 0.37, dtype)
    assert torch.equal(_bits(ours), _bits(expected))
    assert nonfinite == 0


def test_merge_with_factors_the_same_on_any_number_of_threads():
    codes, state = bnb_functional.quantize_4bit(_weight(70, 1024), blocksize=64, quant_type="nf4")
    b, a = torch.randn(70, 16) * 0.01, torch.randn(16, 1024)
    outputs = _on_threads(
        lambda out: nf4_native.merge_4bit_factors(
            codes.reshape(-1), 64, state.code.float(), absmax_float32(state), b, a, 2.0, out
        ),
        (70, 1024),
    )
    assert all(torch.equal(_bits(o), _bits(outputs[0])) for o in outputs)
    expected = _reference(codes, state, _sequential_fma(b, a), 2.0, torch.bfloat16)
    assert torch.equal(_bits(outputs[0]), _bits(expected))


def test_merge_with_factors_refuses_what_it_cannot_serve():
    codes, state = bnb_functional.quantize_4bit(_weight(4, 256), blocksize=64, quant_type="nf4")
    absmax, table, out = absmax_float32(state), state.code.float(), torch.empty(4, 256)
    with pytest.raises(ValueError, match="do not give"):
        nf4_native.merge_4bit_factors(
            codes.reshape(-1), 64, table, absmax, torch.ones(3, 2), torch.ones(2, 256), 1.0, out
        )
    with pytest.raises(ValueError, match="contiguous 2-D float32"):
        nf4_native.merge_4bit_factors(
            codes.reshape(-1),
            64,
            table,
            absmax,
            torch.ones(4, 2, dtype=torch.float64),
            torch.ones(2, 256),
            1.0,
            out,
        )
    # 4-bit blocks of 24 values (whole blocks of the rows, but not whole vectors of 16)
    with pytest.raises(ValueError, match="refused"):
        nf4_native.merge_4bit_factors(
            torch.zeros(4 * 240 // 2, dtype=torch.uint8),
            24,
            table,
            torch.ones(40),
            torch.ones(4, 2),
            torch.ones(2, 240),
            1.0,
            torch.empty(4, 240),
        )


def _factor_merges(monkeypatch) -> list[int]:
    """Count the pass's merges with the product computed in it; have the reader offer them on any
    CPU (elsewhere than AVX-512 they run the plain loop: exact, slower than the BLAS)."""
    calls: list[int] = []
    real = nf4_native.merge_4bit_factors

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nf4_native, "merge_4bit_factors", spy)
    monkeypatch.setattr(nf4_native, "factors_fast", lambda: True)
    fused_rows._inline_exact.clear()
    return calls


def _row_block_checks(monkeypatch) -> list[tuple]:
    """Record the row merge's checks of the BLAS's row blocks against its whole product."""
    checks: list[tuple] = []
    real = row_blocks.blockwise_product_is_exact

    def spy(b, a, step, columns=False):
        checks.append((tuple(b.shape), tuple(a.shape)))
        return real(b, a, step, columns)

    monkeypatch.setattr(row_blocks, "blockwise_product_is_exact", spy)
    return checks


def test_a_save_computes_the_product_in_the_pass_exactly(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    layers = _lora_layers(model)
    expected = {name + ".weight": _oracle(layer) for name, layer in layers.items()}
    calls = _factor_merges(monkeypatch)
    row_checks = _row_block_checks(monkeypatch)
    steps = _fused_steps(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert calls, "no weight's product was computed in the pass"
    # the BLAS's product is never read by rows: its row-block check (a whole product) is not run
    assert row_checks == []
    # no float32 copy of a block: blocks of twice the torch merge's bytes of bfloat16 output
    assert steps
    for step, n_cols, size in steps:
        assert step * n_cols * 2 <= row_blocks.ONE_PASS_BLOCKS * size
        assert step == row_blocks.rows_per_block(n_cols, 1, row_blocks.ONE_PASS_BLOCKS * size * 2)
        assert step > row_blocks.rows_per_block(n_cols, 1, size)
    saved = saved_tensors(tmp_path / "out")
    for name, reference in expected.items():
        assert torch.equal(_bits(saved[name]), _bits(reference.to(torch.bfloat16))), name


def test_a_one_pass_weight_settles_its_working_set_to_one_block_and_its_factors(
    qlora_model, tmp_path, monkeypatch
):
    """A weight merged in one pass was admitted with the torch merge's float32 copies; once its
    plan is known it holds one block of output, the factors' float32 copies and the decoded absmax,
    and says so to the save's budget (the rest may hold pieces for the writer)."""
    from fastsave.memory import ByteBudget

    model = qlora_model()
    layers = _lora_layers(model)
    _factor_merges(monkeypatch)
    steps = _fused_steps(monkeypatch)
    settled: list[tuple[int, int]] = []
    real = ByteBudget.settle

    def spy(self, nbytes):
        settled.append((self.reserved, nbytes))
        real(self, nbytes)

    monkeypatch.setattr(ByteBudget, "settle", spy)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    expected = []
    for (step, n_cols, _), layer in zip(steps, layers.values(), strict=True):
        n_rows = layer.base_layer.weight.quant_state.shape[0]
        rank = layer.lora_A["default"].weight.shape[0]
        absmax = n_rows * n_cols // layer.base_layer.weight.quant_state.blocksize * 4
        expected.append(step * n_cols * 2 + (n_rows + n_cols) * rank * 4 + absmax)
    assert [nbytes for _, nbytes in settled] == expected
    assert all(nbytes < reserved for reserved, nbytes in settled)  # the estimate was larger


def test_a_product_that_is_not_the_blas_keeps_the_blas_product(qlora_model, tmp_path, monkeypatch):
    """A pass whose product differs from the BLAS's in one bit (as MKL's kernel for a few leftover
    rows does) is not used for that shape; the weights merge from the BLAS's product, exactly."""
    model = qlora_model()
    expected = {name + ".weight": _oracle(layer) for name, layer in _lora_layers(model).items()}
    calls = _factor_merges(monkeypatch)
    real = nf4_native.lora_product_mismatches

    def one_bit_off(b, a, reference):  # the BLAS's last value one bit away from the pass's
        reference.view(torch.int32).view(-1)[-1] ^= 1
        return real(b, a, reference)

    monkeypatch.setattr(nf4_native, "lora_product_mismatches", one_bit_off)
    row_checks = _row_block_checks(monkeypatch)
    steps = _fused_steps(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    fused_rows._inline_exact.clear()
    assert calls == []
    assert row_checks, "the BLAS's rows were read without the row-block check"
    # the BLAS's product of a block's rows: the checked blocks, the torch merge's size
    assert steps and all(step == row_blocks.rows_per_block(n_cols, 1, size) for step, n_cols, size in steps)
    saved = saved_tensors(tmp_path / "out")
    for name, reference in expected.items():
        assert torch.equal(_bits(saved[name]), _bits(reference.to(torch.bfloat16))), name


def test_a_plan_whose_delta_is_in_the_one_pass_gives_no_unmerged_rows(qlora_model, monkeypatch):
    """A row plan that left its delta to the one pass (the product computed in it) refuses to be
    read row by row without it, instead of giving the base's rows unmerged; streamed, it merges."""
    from fastsave.buffer_pool import pooled_buffers

    _factor_merges(monkeypatch)
    model = qlora_model()
    name, layer = next(iter(_lora_layers(model).items()))
    source = bnb_4bit.Bnb4bitSource(layer.base_layer)
    delta = LoraDelta(
        "default",
        "linear",
        layer.lora_A["default"].weight.detach(),
        layer.lora_B["default"].weight.detach(),
        float(layer.scaling["default"]),
    )
    plan = row_blocks.row_merge_plan(source, [delta], torch.bfloat16, name)
    assert plan is not None and plan.fused is not None and plan.deltas == []
    with pytest.raises(ValueError, match="one pass"):
        next(row_blocks.merged_rows(plan))
    with pooled_buffers():
        merged = torch.cat([block.reshape(-1) for block in row_blocks.stream_row_blocks(plan)])
    assert torch.equal(_bits(merged.view(source.shape)), _bits(_oracle(layer).to(torch.bfloat16)))


def _fused_steps(monkeypatch) -> list[tuple[int, int, int]]:
    """Record (rows of a block, columns, the save's float32 bytes of a torch merge's block) of each
    one-pass plan a save streams."""
    steps: list[tuple[int, int, int]] = []
    real = row_blocks.stream_fused_rows

    def spy(plan, dtype):
        steps.append((plan.step, plan.shape[1], block_bytes()))
        return real(plan, dtype)

    monkeypatch.setattr(row_blocks, "stream_fused_rows", spy)
    return steps


def _fused_names(monkeypatch) -> list[str]:
    used: list[str] = []
    real = row_blocks.stream_fused_rows

    def spy(plan, dtype):
        used.append(plan.name)
        return real(plan, dtype)

    monkeypatch.setattr(row_blocks, "stream_fused_rows", spy)
    return used


def _saved_exactly_by_the_torch_merge(model, expected: dict, tmp_path, monkeypatch) -> None:
    """Save ``model``: no weight goes through the C pass, and every LoRA weight equals ``expected``."""
    used = _fused_names(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert used == []
    saved = saved_tensors(tmp_path / "out")
    for name, reference in expected.items():
        assert torch.equal(saved[name], reference.to(torch.bfloat16)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_save_merges_its_lora_weights_in_one_pass_exactly(qlora_model, tmp_path, monkeypatch, dtype):
    model = qlora_model()
    layers = _lora_layers(model)
    expected = {name + ".weight": _oracle(layer).to(dtype) for name, layer in layers.items()}
    used = _fused_names(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out", dtype=dtype)
    assert {name + ".weight" for name in layers} <= set(used)
    saved = saved_tensors(tmp_path / "out")
    for name, reference in expected.items():
        assert torch.equal(_bits(saved[name]), _bits(reference)), name


def test_float16_output_and_dora_keep_the_torch_merge(qlora_model, tmp_path, monkeypatch):
    used = _fused_names(monkeypatch)
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "half", dtype=torch.float16)
    fastsave.save_pretrained_merged(qlora_model(use_dora=True), tmp_path / "dora")
    assert used == []


def test_a_code_table_bitsandbytes_does_not_decode_with_keeps_the_torch_merge(
    qlora_model, tmp_path, monkeypatch
):
    """The probe holds the C loop to bitsandbytes' dequantize: a table that is not the one bitsandbytes'
    CPU kernel uses fails it, and those weights merge with torch operations (still exactly)."""
    model = qlora_model()
    layers = _lora_layers(model)
    expected = {name + ".weight": _oracle(layer) for name, layer in layers.items()}
    for layer in layers.values():
        state = layer.get_base_layer().weight.quant_state
        state.code = state.code.clone()
        state.code[5] += 0.001  # not what bitsandbytes' CPU kernel decodes code 5 to
    bnb_4bit.one_pass_matches_bitsandbytes.cache_clear()
    try:
        _saved_exactly_by_the_torch_merge(model, expected, tmp_path, monkeypatch)
    finally:
        bnb_4bit.one_pass_matches_bitsandbytes.cache_clear()


def test_without_the_compiled_library_the_torch_merge_runs(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    expected = {name + ".weight": _oracle(layer) for name, layer in _lora_layers(model).items()}
    monkeypatch.setattr(nf4_native, "available", lambda: False)
    _saved_exactly_by_the_torch_merge(model, expected, tmp_path, monkeypatch)


def test_a_nan_in_a_merged_block_fails_the_save_naming_the_tensor(qlora_model, tmp_path, monkeypatch):
    from fastsave.errors import NonFiniteError

    model = qlora_model()
    layer = _lora_layers(model)["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight[3, 0] = float("nan")
    used = _fused_names(monkeypatch)
    with pytest.raises(NonFiniteError, match=re.escape("model.layers.1.mlp.down_proj.weight")):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert "model.layers.1.mlp.down_proj.weight" in used
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_merged_blocks_are_not_read_again_for_nan(qlora_model, tmp_path, monkeypatch):
    """The C pass counts NaN/Inf as it rounds; the writer's check reads only the other tensors."""
    from fastsave.io import finite

    model = qlora_model()
    lora_weights = {name + ".weight" for name in _lora_layers(model)}
    used = _fused_names(monkeypatch)
    read: list[int] = []
    real_aminmax, real_count = torch.aminmax, finite.count_nonfinite

    def spy_aminmax(tensor, *args, **kwargs):
        read.append(tensor.numel())
        return real_aminmax(tensor, *args, **kwargs)

    def spy_count(tensor):  # the C count, where it applies; else the check reads with aminmax
        counted = real_count(tensor)
        if counted is not None:
            read.append(tensor.numel())
        return counted

    monkeypatch.setattr(finite.torch, "aminmax", spy_aminmax)
    monkeypatch.setattr(finite, "count_nonfinite", spy_count)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert sorted(used) == sorted(lora_weights)
    saved = saved_tensors(tmp_path / "out")
    others = sum(t.numel() for name, t in saved.items() if name not in lora_weights and t.is_floating_point())
    assert sum(read) == others
    assert not finite._counted  # every vouched block was taken by its check (or freed)


def _dense_rows(dtype: torch.dtype) -> torch.Tensor:
    """Random rows of a 16-bit or float32 weight, with subnormals, values whose sum overflows,
    infinities and float32 values halfway between two bfloat16 values (odd and even below)."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(40, 1000, generator=generator)
    rows[1] *= 1e-38 if dtype != torch.float16 else 1e-6
    rows[2] *= 3e38 if dtype != torch.float16 else 6e4
    rows[3, :100] = float("inf")
    rows[3, 100:200] = float("-inf")
    rows[4, :512] = (torch.arange(1, 513, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    return rows.to(dtype)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_delta", [True, False])
def test_dense_merge_equals_the_torch_row_merge(decoder, stored, dtype, with_delta):
    """The C merge of 16-bit / float32 rows against the torch row merge: the rows as float32, plus
    the product times the scaling, one rounding; on 1, 2 and 7 threads, NaN/Inf counted."""
    rows = _dense_rows(stored)
    generator = torch.Generator().manual_seed(6)
    product = (torch.randn(40, 8, generator=generator) @ torch.randn(8, 1000, generator=generator)) * 0.05
    product[4] = 0.0  # the tie row reaches the rounding as it is
    scaling = 1.7
    reference = rows.to(torch.float32, copy=True)
    if with_delta:
        reference.add_(product.clone().mul_(scaling))
    expected = reference.to(dtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            ours = torch.empty(40, 1000, dtype=dtype)
            counted = nf4_native.merge_dense(rows, product if with_delta else None, scaling, ours)
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(ours), nan)
            assert torch.equal(_bits(ours)[~nan], _bits(expected)[~nan])
            assert counted == int((~torch.isfinite(expected)).sum()) > 0
    finally:
        torch.set_num_threads(before)


def test_dense_merge_refuses_what_it_cannot_read():
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        nf4_native.merge_dense(torch.ones(8, 4, dtype=torch.bfloat16).T, None, 1.0, out)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        nf4_native.merge_dense(torch.ones(4, 8, dtype=torch.float64), None, 1.0, out)
    with pytest.raises(ValueError, match="out must be"):
        nf4_native.merge_dense(torch.ones(4, 8), None, 1.0, torch.empty(4, 8, dtype=torch.float16))


def test_a_16bit_lora_model_merges_its_lora_weights_in_one_pass_exactly(tiny_base_dir, tmp_path, monkeypatch):
    """LoRA on an unquantized bfloat16 model in memory: every LoRA weight goes through the C pass
    and equals peft's merge on a float32 copy of the model, rounded once."""
    from transformers import AutoModelForCausalLM

    from fastsave.tiny import attach_lora

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.bfloat16)
    model = attach_lora(base)
    lora_weights = {name + ".weight" for name in _lora_layers(model)}
    reference = copy.deepcopy(model).to(torch.float32).merge_and_unload().state_dict()
    used = _fused_names(monkeypatch)
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert sorted(used) == sorted(lora_weights)
    saved = saved_tensors(tmp_path / "out")
    for name in lora_weights:
        assert torch.equal(_bits(saved[name]), _bits(reference[name].to(torch.bfloat16))), name


def _every_bfloat16_and_the_cells_edges() -> torch.Tensor:
    """Rows of float32 values in blocks of 64: every bfloat16 bit pattern (NaN and infinities too,
    at whatever absmax its block has), then blocks whose absmax is 1 holding the float32 values
    next to every rounding boundary of NF4 and FP4 and next to every k/16 in [-1, 1] (the edges of
    the AVX-512 round trip's 32 cells), on both sides."""
    every = (torch.arange(65536, dtype=torch.int32) << 16).view(torch.float32)
    near = []
    for quant_type in ("nf4", "fp4"):
        boundaries, ordered = nf4_fused._tables(quant_type)
        near += [boundaries, ordered]
    near.append(torch.arange(-16, 17, dtype=torch.float32) / 16)
    points = torch.cat(near).view(torch.int32)
    steps = torch.arange(-8, 9, dtype=torch.int32)
    around = (points.view(-1, 1) + steps.view(1, -1)).reshape(-1).view(torch.float32)
    around = torch.cat([around, -around])
    around = around[around.abs() <= 1]
    around = torch.cat([around, torch.zeros(-around.numel() % 63)]).view(-1, 63)
    around = torch.cat([around, torch.ones(around.shape[0], 1)], 1).reshape(-1)  # each block's absmax is 1
    values = torch.cat([every, around])
    values = torch.cat([values, torch.zeros(-values.numel() % 256)])
    return values.view(-1, 256)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_of_every_bfloat16_and_every_cell_edge_equals_bitsandbytes(decoder, quant_type):
    """Each decoder's round trip (the AVX-512 one looks codes up by cells of [-1, 1]) against
    bitsandbytes' quantize + dequantize, alone and merged in the same pass, with each block's own
    absmax and with a decoding absmax of its own."""
    rows = _every_bfloat16_and_the_cells_edges()
    boundaries, ordered = nf4_fused._tables(quant_type)
    # a block holding a NaN decodes with a NaN absmax, as it would in a save (its own, or the
    # double-quantized ones, all NaN once their mean is)
    own = rows.reshape(-1, 64).abs().amax(1)
    for absmax in (None, own * 1.0078125):
        expected = nf4_fused.bitsandbytes_round_trip(rows, 64, quant_type, absmax)
        got = nf4_native.round_trip(rows, 64, boundaries, ordered, absmax)
        nan = torch.isnan(expected)  # the blocks holding a NaN or an infinity: NaN, whatever its bits
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(_bits(got)[~nan], _bits(expected)[~nan])
        product = torch.randn(rows.shape, generator=torch.Generator().manual_seed(4)) * 0.01
        merged = torch.empty(rows.shape, dtype=torch.bfloat16)
        counted = nf4_native.round_trip_merge(rows, 64, boundaries, ordered, absmax, product, 0.5, merged)
        reference = (expected + product * 0.5).to(torch.bfloat16)
        nan = torch.isnan(reference)
        assert torch.equal(torch.isnan(merged), nan)
        assert torch.equal(_bits(merged)[~nan], _bits(reference)[~nan])
        assert counted == int((~torch.isfinite(reference)).sum())


def test_rounding_to_bfloat16_at_every_tie_and_edge(decoder):
    """Each decoder's merge rounds float32 to bfloat16 as torch does: ties to even, the largest
    values to infinity, subnormals, signed zeros, NaN; float32 output copied; non-finite counted."""
    high = torch.tensor(
        [0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F, 0x7F80, 0x7FC0, 0x7FFF],
        dtype=torch.int32,
    )
    low = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    bits = ((high.view(-1, 1) << 16) | low.view(1, -1)).reshape(-1)
    bits = torch.cat([bits, bits | torch.tensor(-0x80000000, dtype=torch.int32)])
    values = bits.view(torch.float32)
    values = torch.cat([values, torch.zeros(-values.numel() % 50)]).view(-1, 50)
    for dtype in (torch.bfloat16, torch.float32):
        expected = values.to(dtype)
        ours = torch.empty(values.shape, dtype=dtype)
        counted = nf4_native.merge_dense(values, None, 1.0, ours)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(ours), nan)
        assert torch.equal(_bits(ours)[~nan], _bits(expected)[~nan])
        assert counted == int((~torch.isfinite(expected)).sum()) > 0
