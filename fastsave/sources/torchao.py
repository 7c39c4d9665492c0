"""A torchao-quantized weight (a tensor subclass on a plain nn.Linear), dequantized by torchao in float32.

torchao replaces ``linear.weight`` with a tensor subclass: Int8Tensor for int8 weight-only,
IntxUnpackedToInt8Tensor for ``IntxWeightOnlyConfig`` (int1..int8 values, int4 included, the
int4 weight-only path torchao runs on a CPU), and others. The merge asks torchao's own
dequantization for float32, so the values carry no 16-bit rounding: ``dequantize(output_dtype=
torch.float32)`` where the class takes that argument; for IntxUnpackedToInt8Tensor, whose
``dequantize()`` always returns its 16-bit dtype, the same ``dequantize_affine`` call it makes,
with ``output_dtype=torch.float32``. A class fastsave does not know is refused while planning.
"""

from __future__ import annotations

import inspect

import torch

from fastsave.errors import UnsupportedAdapterError
from fastsave.sources.base import Source

try:
    from torchao.utils import TorchAOBaseTensor
except ImportError:  # torchao is optional: only models quantized with it need it
    TorchAOBaseTensor = None


def is_torchao_tensor(tensor: torch.Tensor) -> bool:
    """True for a torchao quantized tensor subclass."""
    return TorchAOBaseTensor is not None and isinstance(tensor, TorchAOBaseTensor)


def _intx_float32(tensor: torch.Tensor) -> torch.Tensor:
    """IntxUnpackedToInt8Tensor.dequantize's own computation, asked for float32."""
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[tensor.target_dtype]
    return dequantize_affine(
        tensor.qdata,
        tensor.block_size,
        tensor.scale,
        tensor.zero_point,
        torch.int8,
        qmin,
        qmax,
        output_dtype=torch.float32,
    )


def _float32_reader(tensor: torch.Tensor):
    kind = type(tensor)
    if "output_dtype" in inspect.signature(kind.dequantize).parameters:
        return lambda: tensor.dequantize(output_dtype=torch.float32)
    if kind.__name__ == "IntxUnpackedToInt8Tensor":
        return lambda: _intx_float32(tensor)
    return None


class TorchaoSource(Source):
    """A torchao quantized weight."""

    kind = "torchao"
    computed = True

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype, tensor.device)
        self.tensor = tensor
        self._read = _float32_reader(tensor)
        if self._read is None:
            raise UnsupportedAdapterError(
                f"torchao's {type(tensor).__name__} gives no float32 dequantization fastsave knows, so it "
                "cannot be merged exactly; save with save_method='lora'"
            )

    @property
    def floating(self) -> bool:
        """Quantized codes of a floating-point weight."""
        return True

    def float32(self) -> torch.Tensor:
        """torchao's own dequantization, in float32."""
        return self._read().to(torch.float32).contiguous()

    def as_stored(self) -> torch.Tensor:
        """Not a stored tensor of plain values: its float32 dequantization."""
        return self.float32()

    def describe(self) -> str:
        """'torchao Int8Tensor' and the like."""
        return f"torchao {type(self.tensor).__name__}"
