"""A torchao-quantized weight (a tensor subclass on a plain nn.Linear), dequantized by torchao in float32.

torchao replaces ``linear.weight`` with a tensor subclass (Int8Tensor for int8 weight-only,
Int4 tensors, AffineQuantizedTensor in older releases) whose ``dequantize(output_dtype=...)`` is
the backend's own dequantization; asked for float32, its result has no 16-bit rounding.
"""

from __future__ import annotations

import inspect

import torch

from fastsave.sources.base import Source

try:
    from torchao.utils import TorchAOBaseTensor
except ImportError:  # torchao is optional: only models quantized with it need it
    TorchAOBaseTensor = None


def is_torchao_tensor(tensor: torch.Tensor) -> bool:
    """True for a torchao quantized tensor subclass."""
    return TorchAOBaseTensor is not None and isinstance(tensor, TorchAOBaseTensor)


class TorchaoSource(Source):
    """A torchao quantized weight."""

    kind = "torchao"

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype, tensor.device)
        self.tensor = tensor
        parameters = inspect.signature(type(tensor).dequantize).parameters
        if "output_dtype" not in parameters:
            raise TypeError(
                f"torchao's {type(tensor).__name__} cannot dequantize to float32 (no output_dtype "
                "argument); fastsave cannot merge it exactly: save with save_method='lora'"
            )

    @property
    def floating(self) -> bool:
        """Quantized codes of a floating-point weight."""
        return True

    def float32(self) -> torch.Tensor:
        """torchao's own dequantize, asked for float32."""
        return self.tensor.dequantize(output_dtype=torch.float32).contiguous()

    def describe(self) -> str:
        """'torchao Int8Tensor' and the like."""
        return f"torchao {type(self.tensor).__name__}"
