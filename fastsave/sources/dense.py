"""A plain tensor in memory: an unquantized weight, a bias, a norm, a buffer, a trained copy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch

from fastsave.dtypes import same_bits
from fastsave.sources import nf4_native
from fastsave.sources.base import RowReader, RowReadMerged, Source

logger = logging.getLogger(__name__)


class DenseSource(Source):
    """A tensor the model (or the caller) holds as plain values."""

    kind = "16-bit"

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype, tensor.device)
        self.tensor = tensor

    def float32(self) -> torch.Tensor:
        """A float32 copy."""
        return self.tensor.detach().to(torch.float32, copy=True)

    def as_stored(self) -> torch.Tensor:
        """The tensor itself (detached)."""
        return self.tensor.detach()

    def row_reader(self) -> RowReader | None:
        """Rows of a 2-D floating tensor, as float32 copies on the CPU (from a GPU too)."""
        tensor = self.tensor.detach()
        if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.device.type == "meta":
            return None
        in_one_pass = tensor.device.type == "cpu" and tensor.is_contiguous()
        return RowReader(
            lambda i, j: tensor[i:j].to(device="cpu", dtype=torch.float32, copy=True),
            read_merged=merged_in_one_pass(tensor.dtype, lambda i, j: tensor[i:j]) if in_one_pass else None,
            held_bytes=0,  # the one pass reads the tensor's own rows
        )

    def describe(self) -> str:
        """'16-bit' for half-precision weights, else the dtype's name."""
        if self.stored_dtype in (torch.float16, torch.bfloat16):
            return "16-bit"
        return str(self.stored_dtype).removeprefix("torch.")


def merged_in_one_pass(dtype: torch.dtype, rows: Callable[[int, int], torch.Tensor]) -> RowReadMerged | None:
    """Rows ``rows(i, j)`` (contiguous, on the CPU, stored in ``dtype``: a tensor in memory, or a
    checkpoint's mapped pages) merged with a LoRA product and rounded by one C pass
    (fastsave.merge.fused_rows, nf4_native.merge_dense), where the compiled library is here and its
    probe for the dtype gives the torch row merge's bits; else None (the torch merge runs)."""
    if (
        dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or not nf4_native.available()
        or not compiled_dense_merge_matches(dtype)
    ):
        return None

    def read_merged(i: int, j: int, product: torch.Tensor | None, scaling: float, out: torch.Tensor) -> int:
        return nf4_native.merge_dense(rows(i, j), product, scaling, out)

    return read_merged


@cache
def compiled_dense_merge_matches(dtype: torch.dtype) -> bool:
    """Whether the C merge of rows stored in ``dtype`` gives the bits of the torch row merge (the
    rows as float32, plus the product times the scaling, one rounding), for bfloat16 and float32
    output, with and without a product, on values that round to even, reach subnormals and
    overflow to infinity."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 384, generator=generator)
    rows[1] *= 1e-38 if dtype != torch.float16 else 1e-6  # subnormal in the stored dtype
    rows[2] *= 3e38 if dtype != torch.float16 else 6e4  # the add overflows
    rows[3, :64] = float("inf")
    # float32 values halfway between two bfloat16 values: low 16 bits 0x8000, odd and even above
    ties = torch.arange(1, 257, dtype=torch.int32) << 16 | 0x8000
    rows[4, :256] = ties.view(torch.float32)
    rows = rows.to(dtype)
    product = torch.randn(8, 4, generator=generator) @ torch.randn(4, 384, generator=generator)
    product[4] = 0.0  # the tie rows reach the rounding unchanged
    for out_dtype in (torch.bfloat16, torch.float32):
        for delta in (product, None):
            block = rows.to(torch.float32, copy=True)  # as the row reader reads them
            expected = (block.add_(delta * 0.3) if delta is not None else block).to(out_dtype)
            ours = torch.empty(8, 384, dtype=out_dtype)
            nf4_native.merge_dense(rows, delta, 0.3, ours)
            if not same_bits(ours, expected):
                logger.info(
                    "fastsave: the compiled merge of %s rows differs from the torch merge; merging "
                    "those weights with torch operations",
                    str(dtype).removeprefix("torch."),
                )
                return False
    return True
