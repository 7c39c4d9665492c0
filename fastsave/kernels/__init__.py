"""Triton kernels for fastsave: 4-bit dequantize and the LoRA merge on a GPU (``fastsave.kernels``).

They live inside the package, not in a ``kernels/`` folder at the repository's root: the Hugging
Face ``kernels`` package (transformers >= 5.25 depends on it; transformers and bitsandbytes import
it) has that name, and Python puts the folder it starts in first on ``sys.path`` (``python -c``,
``python -m``, subprocesses, torchrun ranks), so a root folder of that name would be found first.
"""

from ._api import REFERENCE_PATH_ENV, available, dequantize_4bit, merge_lora_4bit

__all__ = ["REFERENCE_PATH_ENV", "available", "dequantize_4bit", "merge_lora_4bit"]
