"""Output formats other than the plain 16-bit checkpoint: each a transformation of the plan.

A format is one module here that describes itself with an :class:`OutputFormat` (its
``save_method``, how it transforms the checkpoint's plan, whether config.json keeps the
quantization_config, its lines in the save's summary) and one :func:`register` line below;
registering makes its ``save_method`` valid (fastsave.options) and the save path
(fastsave.pipeline.run) apply it.

* :mod:`fastsave.formats.requantize_4bit`: ``save_method="merged_4bit_forced"``, the merged weights
  re-quantized to bitsandbytes 4-bit in transformers' 4-bit checkpoint layout.
* :mod:`fastsave.formats.compressed_tensors`: ``save_method="fp8"``, ``"fp8_block"``, ``"w8a16"``,
  ``"w4a16"``, ``"w4a16_asym"``, ``"nvfp4a16"``, ``"mxfp4a16"``: the Linear weights quantized as
  llm-compressor's data-free schemes, in compressed-tensors' format (vLLM).
"""

from __future__ import annotations

from fastsave.formats import compressed_tensors, requantize_4bit
from fastsave.formats.registry import OutputFormat, format_of, quantization_config_of, register, unregister

__all__ = ["OutputFormat", "format_of", "quantization_config_of", "register", "unregister"]

register(requantize_4bit.FORMAT)
for _format in compressed_tensors.FORMATS:
    register(_format)
