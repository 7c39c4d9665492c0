"""Output formats other than the plain 16-bit checkpoint: each a transformation of the plan.

A format is one module here that describes itself with an :class:`OutputFormat` (its
``save_method``, how it transforms the checkpoint's plan, whether config.json keeps the
quantization_config, its lines in the save's summary) and one :func:`register` line below;
registering makes its ``save_method`` valid (fastsave.options) and the save path
(fastsave.pipeline.run) apply it.

* :mod:`fastsave.formats.requantize_4bit`: ``save_method="merged_4bit_forced"``, the merged weights
  re-quantized to bitsandbytes 4-bit in transformers' 4-bit checkpoint layout.
"""

from __future__ import annotations

from fastsave.formats import requantize_4bit
from fastsave.formats.registry import OutputFormat, format_of, register, unregister

__all__ = ["OutputFormat", "format_of", "register", "unregister"]

register(requantize_4bit.FORMAT)
