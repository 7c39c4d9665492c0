"""A bitsandbytes LLM.int8 weight: int8 codes times a per-row scale / 127."""

from __future__ import annotations

import torch
from torch import nn

from fastsave.sources.backends import QuantizedLinear, optional_classes
from fastsave.sources.base import RowReader, Source
from fastsave.sources.bnb import bnb, bnb_functional, converted_from_conv1d, is_8bit_module


def int8_row_scale(module: nn.Module) -> torch.Tensor:
    """The per-row scale (SCB) of an LLM.int8 weight, in float32: on the parameter or the layer state."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return scb.to(torch.float32)


class Bnb8bitSource(Source):
    """A Linear8bitLt's weight, dequantized with bitsandbytes' own int8_vectorwise_dequant."""

    kind = "8-bit"
    computed = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(tuple(module.weight.shape), module.weight.dtype, module.weight.device)
        self.module = module

    @property
    def floating(self) -> bool:
        """Quantized codes of a floating-point weight."""
        return True

    def float32(self) -> torch.Tensor:
        """codes * SCB / 127 in float32."""
        codes = self.module.weight.data
        return bnb_functional.int8_vectorwise_dequant(codes, int8_row_scale(self.module)).to(torch.float32)

    def row_reader(self) -> RowReader | None:
        """Rows into the CPU, decoded where the codes are (the scale is per row, so any row range
        decodes on its own)."""
        codes = self.module.weight.data
        if codes.device.type == "meta":
            return None
        scale = int8_row_scale(self.module)
        return RowReader(
            lambda i, j: bnb_functional.int8_vectorwise_dequant(codes[i:j], scale[i:j]).to(
                device="cpu", dtype=torch.float32
            )
        )


def compute_dtype_of_8bit(module: nn.Module) -> torch.dtype:
    """The dtype an LLM.int8 layer computes in (its bias's, else float16)."""
    return module.bias.dtype if module.bias is not None else torch.float16


BACKEND = QuantizedLinear(
    name="bitsandbytes 8-bit",
    layer_classes=(bnb.nn.Linear8bitLt,) if bnb is not None else (),
    holds_quantized=is_8bit_module,
    source=Bnb8bitSource,
    compute_dtype=compute_dtype_of_8bit,
    transposed=converted_from_conv1d,
    lora_layer_classes=optional_classes(("peft.tuners.lora.bnb", "Linear8bitLt")),
)
