"""Sources read by rows give the bits of the whole tensor, checked against the backends themselves."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from fastsave.sources.bnb_4bit import Quant4bitSettings
from fastsave.sources.dense import DenseSource
from fastsave.sources.nf4_roundtrip import Nf4RoundTripSource


@pytest.mark.parametrize(
    ("shape", "quant_type", "double_quant", "blocksize", "stored"),
    [
        ((300, 512), "nf4", True, 64, torch.bfloat16),
        ((96, 256), "fp4", True, 128, torch.bfloat16),
        ((1000, 128), "nf4", False, 32, torch.float32),  # stored float32, loaded (cast) as bfloat16
        ((64, 4096), "nf4", True, 256, torch.bfloat16),
    ],
)
def test_nf4_round_trip_by_rows_equals_bitsandbytes_on_the_whole_tensor(
    shape, quant_type, double_quant, blocksize, stored
):
    """Double quantization is global (mean of every absmax): the row reader's first pass must reproduce it."""
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(stored)
    codes, state = bnb_functional.quantize_4bit(
        weight.to(torch.bfloat16),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    state.dtype = torch.float32
    expected = bnb_functional.dequantize_4bit(codes, state)  # bitsandbytes on the whole tensor, float32

    source = Nf4RoundTripSource(
        DenseSource(weight), Quant4bitSettings(quant_type, blocksize, double_quant), torch.bfloat16, False
    )
    reader = source.row_reader()
    assert reader is not None
    rows = shape[0]
    for step in (7, 32, rows):
        by_rows = torch.cat([reader.read(i, min(rows, i + step)) for i in range(0, rows, step)])
        assert torch.equal(by_rows, expected), step
    assert torch.equal(source.float32(), expected)


def test_nf4_round_trip_of_a_conv1d_weight_is_not_read_by_rows():
    """A Conv1D weight is quantized transposed: its rows are not the quantized rows."""
    source = Nf4RoundTripSource(
        DenseSource(torch.randn(64, 128)), Quant4bitSettings(), torch.bfloat16, conv1d=True
    )
    assert source.row_reader() is None
