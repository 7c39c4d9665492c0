"""GGUF export: merge to a temporary 16-bit checkpoint, convert with llama.cpp, verify, report.

One job per module: ``llama_cpp`` finds llama.cpp, ``methods`` names the quantization types,
``space`` checks disk space, ``convert`` runs llama.cpp's tools, ``verify`` reads the result back
with the gguf package, ``save_gguf`` puts them together.
"""

from fastsave.export.save_gguf import push_to_hub_gguf, save_pretrained_gguf

__all__ = ["push_to_hub_gguf", "save_pretrained_gguf"]
