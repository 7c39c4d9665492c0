"""Blocks of a low-rank product whose BLAS does not give the whole product's bits a block at a
time (fastsave.merge.row_blocks.product_blocks): the weight still merges by rows, its blocks read
from the whole product computed once (in memory within the allowance for whole tensors, else a
spilled file), never through the whole-matrix merge's float32 copies; the result is held to
torch's whole product and to peft's merge on a float32 dequantized copy."""

from __future__ import annotations

import pytest
import test_tuners
import torch
from checkpoint_files import saved_tensors
from patch_sites import blas_blocks_with_negative_zeros
from peft import get_peft_model
from test_core_merged import _lora_layers, _oracle
from test_fidelity import _load, check_exact
from test_tuners import perturb_trained, tuner_config

import fastsave
from fastsave.merge import dispatch, fused_rows, row_blocks
from fastsave.merge.assemble import Assembler, assembling

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
base_dir = test_tuners.base_dir  # the fixture: tiny random bf16 checkpoints, one per architecture


@pytest.mark.parametrize("columns", [False, True])
def test_blocks_of_a_product_that_fails_its_check_come_from_the_whole_product(tmp_path, monkeypatch, columns):
    generator = torch.Generator().manual_seed(3)
    b = torch.randn(300, 16, generator=generator)
    b[7] = 0.0  # zeros in the whole product, which blocks computed alone would sign otherwise
    a = torch.randn(16, 200, generator=generator)
    a[:, 11] = 0.0
    blas_blocks_with_negative_zeros(monkeypatch, (300, 200))
    row_blocks._exact_shapes.clear()
    # an allowance for whole tensors smaller than the product (it goes to a file), the check's own
    # reference kept in memory beside it
    assembler = Assembler(
        tmp_path / "spill", allowance=64 << 10, block_bytes=1 << 16, check_allowance=1 << 20
    )
    try:
        with assembling(assembler):
            assert not row_blocks.blockwise_product_is_exact(b, a, 64, columns)
            blocks = row_blocks.product_blocks(b, a, 64, columns)
    finally:
        row_blocks._exact_shapes.clear()
    assert assembler.spilled_bytes == 300 * 200 * 4  # computed whole once, spilled
    whole = b @ a  # torch's own whole product: the bits peft's merge adds
    extent = 200 if columns else 300
    for i in range(0, extent, 64):
        j = min(extent, i + 64)
        block = blocks(i, j)
        expected = whole[:, i:j] if columns else whole[i:j]
        assert torch.equal(block.view(torch.int32), expected.contiguous().view(torch.int32)), (i, j)
        block.mul_(2.0)  # the caller scales its block in place: the whole product is not touched
        assert torch.equal(blocks(i, j), expected)


def _no_block_check_passes(monkeypatch) -> None:
    """Every BLAS row-block check fails and the one pass may not compute the product itself."""
    monkeypatch.setattr(row_blocks, "blockwise_product_is_exact", lambda *args, **kwargs: False)
    monkeypatch.setattr(fused_rows, "inline_product_is_exact", lambda b, a: False)


def _no_whole_matrix_merge(monkeypatch) -> None:
    def whole_matrix(source, deltas):
        raise AssertionError("a weight was merged whole, not in row blocks")

    monkeypatch.setattr(dispatch, "merge_whole", whole_matrix)


def test_a_qlora_save_whose_block_checks_fail_still_merges_by_rows_exactly(
    qlora_model, tmp_path, monkeypatch
):
    """Before, each such weight went to the whole-matrix merge (three float32 copies of it in fresh
    memory, outside the save's budget); the one pass, which would multiply each block's rows
    alone, is not used for them either."""
    model = qlora_model()
    layers = _lora_layers(model)
    expected = {name + ".weight": _oracle(layer) for name, layer in layers.items()}
    _no_block_check_passes(monkeypatch)
    _no_whole_matrix_merge(monkeypatch)
    one_pass: list[str] = []
    real = row_blocks.stream_fused_rows
    monkeypatch.setattr(
        row_blocks, "stream_fused_rows", lambda plan, dtype: one_pass.append(plan.name) or real(plan, dtype)
    )
    fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert not set(one_pass) & set(expected), one_pass
    saved = saved_tensors(tmp_path / "out")
    for name, reference in expected.items():
        assert torch.equal(saved[name], reference.to(torch.bfloat16)), name


@pytest.mark.parametrize("tuner", ["LoHa", "AdaLoRA", "VeRA"])
def test_tuners_whose_block_checks_fail_still_merge_by_rows_exactly(tuner, base_dir, tmp_path, monkeypatch):
    base = base_dir()
    model = get_peft_model(_load(base, bits=None), tuner_config(tuner))
    perturb_trained(model)
    _no_block_check_passes(monkeypatch)
    _no_whole_matrix_merge(monkeypatch)
    check_exact(model, base, tmp_path, f"{tuner} on a bf16 base, block checks failing")
