"""A plain tensor in memory: an unquantized weight, a bias, a norm, a buffer, a trained copy."""

from __future__ import annotations

import torch

from fastsave.sources.base import RowReader, Source


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
        return RowReader(lambda i, j: tensor[i:j].to(device="cpu", dtype=torch.float32, copy=True))

    def describe(self) -> str:
        """'16-bit' for half-precision weights, else the dtype's name."""
        if self.stored_dtype in (torch.float16, torch.bfloat16):
            return "16-bit"
        return str(self.stored_dtype).removeprefix("torch.")
