"""Output formats other than the plain 16-bit checkpoint the plan describes.

* :mod:`fastsave.formats.requantize_4bit`: ``save_method="merged_4bit_forced"``, the merged weights
  re-quantized to bitsandbytes 4-bit in transformers' 4-bit checkpoint layout.
"""
