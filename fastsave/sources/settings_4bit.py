"""The settings a weight is quantized to 4 bits with: the arguments of bitsandbytes' ``quantize_4bit``.

Kept apart from the bitsandbytes source itself: a source of any kind can carry them
(``Source.quant_settings``), and the plan and the re-quantizing output format read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quant4bitSettings:
    """How one weight is quantized: the arguments of ``bitsandbytes.functional.quantize_4bit``."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(
                f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}"
            )

    def describe(self) -> str:
        """'nf4, blocksize 64, double quant True', for logs."""
        return f"{self.quant_type}, blocksize {self.blocksize}, double quant {self.double_quant}"
