"""An HQQ-quantized weight (the hqq package's HQQLinear), dequantized by hqq itself in float32.

HQQ stores W_q (packed integer codes) and a meta dict with per-group ``scale`` and ``zero``
(themselves possibly quantized, or packed together), and dequantizes as
``(unpack(W_q) - zero) * scale`` in its compute dtype. For the merge, hqq's own
``Quantizer.dequantize`` runs on a copy of the meta whose scale, zero and compute dtype are
float32, so the values are the backend's dequantization with no intermediate 16-bit rounding. The
module's own meta is never changed (HQQLinear.dequantize adds and deletes keys on it).
"""

from __future__ import annotations

import torch
from torch import nn

from fastsave.sources.backends import QuantizedLinear, optional_classes
from fastsave.sources.base import Source

try:
    from hqq.core.quantize import HQQLinear, Quantizer
except ImportError:  # hqq is optional: only models quantized with it need it
    HQQLinear = Quantizer = None


def is_hqq_module(module: nn.Module) -> bool:
    """True for an hqq HQQLinear layer holding a quantized weight."""
    return (
        HQQLinear is not None and isinstance(module, HQQLinear) and getattr(module, "W_q", None) is not None
    )


def _float32_meta(meta: dict, device: torch.device) -> dict:
    """A copy of an HQQ meta dict whose scale, zero and compute dtype are float32, decoded where quantized."""
    meta = dict(meta)
    if "zero_scale" in meta:
        zero_scale = meta.pop("zero_scale").to(device=device)
        if zero_scale.dtype == torch.uint8:
            meta["zero_q"], meta["scale_q"] = zero_scale[0], zero_scale[1]
        else:
            meta["zero"], meta["scale"] = zero_scale[0], zero_scale[1]
    if meta.get("quant_zero"):
        meta["zero"] = Quantizer.dequantize(
            meta["zero_q"].to(device=device), _float32_meta(meta["meta_zero"], device)
        )
    if meta.get("quant_scale"):
        meta["scale"] = Quantizer.dequantize(
            meta["scale_q"].to(device=device), _float32_meta(meta["meta_scale"], device)
        )
    for key in ("zero", "scale"):
        if key in meta:
            meta[key] = torch.as_tensor(meta[key], device=device).to(torch.float32)
    meta["compute_dtype"] = torch.float32
    return meta


class HqqSource(Source):
    """An HQQLinear's weight."""

    kind = "HQQ"
    computed = True

    def __init__(self, module: nn.Module) -> None:
        shape = tuple(module.meta["shape"])
        super().__init__(shape, module.W_q.dtype, module.W_q.device)
        self.module = module
        self.compute_dtype = getattr(module, "compute_dtype", None)

    @property
    def floating(self) -> bool:
        """Quantized codes of a floating-point weight."""
        return True

    def float32(self) -> torch.Tensor:
        """hqq's Quantizer.dequantize with a float32 meta: (W_q - zero) * scale, no 16-bit rounding."""
        module = self.module
        return Quantizer.dequantize(module.W_q.data, _float32_meta(module.meta, module.W_q.device)).reshape(
            self.shape
        )

    def describe(self) -> str:
        """'HQQ 4-bit' and the like."""
        return f"HQQ {self.module.meta.get('nbits', '?')}-bit"


BACKEND = QuantizedLinear(
    name="HQQ",
    layer_classes=(HQQLinear,) if HQQLinear is not None else (),
    holds_quantized=is_hqq_module,
    source=HqqSource,
    compute_dtype=lambda module: getattr(module, "compute_dtype", None),
    weight=lambda module: module.W_q,
    lora_layer_classes=optional_classes(("peft.tuners.lora.hqq", "HqqLoraLinear")),
)
