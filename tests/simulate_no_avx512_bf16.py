"""pytest plugin: run the tests as on a CPU without AVX512-BF16, on any CPU.

    python -m pytest -p tests.simulate_no_avx512_bf16 tests/test_core_merged.py

bitsandbytes decides at import time whether to register its AVX512-BF16 CPU kernels
(``backends/cpu/ops.py`` imports ``functional.has_avx512bf16`` and calls it), and every Linear4bit
asks again when it is built. This plugin makes ``has_avx512bf16`` answer False from the moment
``bitsandbytes.functional`` is loaded, before the CPU backend reads it: no repacking forward, no
kernel for the repacked layout, as on such a machine.
"""

from __future__ import annotations

import importlib.abc
import sys


def _no_avx512_bf16() -> bool:
    return False


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            module.has_avx512bf16 = _no_avx512_bf16

        loader.exec_module = exec_module
        return spec


if "bitsandbytes" in sys.modules:
    raise RuntimeError("simulate_no_avx512_bf16 must be loaded before bitsandbytes (use -p)")
sys.meta_path.insert(0, _PatchAfterLoad())
