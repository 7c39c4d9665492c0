"""Triton kernels for fastsave, installed as ``fastsave.kernels``.

This folder is never a top-level ``kernels`` module. The Hugging Face ``kernels`` package has that
name (transformers >= 5.25 depends on it; transformers and bitsandbytes import it), and Python puts
the repository root first on ``sys.path`` whenever it starts there (``python -c``, ``python -m``,
subprocesses, torchrun ranks), so ``import kernels`` finds this file before site-packages.

Found under that name, this file hands the import on: it loads the ``kernels`` that the rest of
``sys.path`` holds (the Hugging Face package) and puts it in ``sys.modules`` in its place, which is
what the ``import`` statement then returns. With no other ``kernels`` installed it leaves an empty
module (no ``__file__``, no ``__version__``, no API, nothing below it): transformers' availability
probe reads exactly that as "not installed", and ``from kernels import get_kernel`` fails with the
ImportError that bitsandbytes expects. (Raising would crash transformers' probe, which imports the
module when it finds no metadata and does not catch errors.)
"""

if __name__ == "fastsave.kernels":
    from ._api import REFERENCE_PATH_ENV, available, dequantize_4bit, merge_lora_4bit

    __all__ = ["REFERENCE_PATH_ENV", "available", "dequantize_4bit", "merge_lora_4bit"]
else:

    def _hand_on() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != here]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[__name__]
            raise

    _hand_on()
    del _hand_on, __file__
    __path__: list[str] = []
    __all__: list[str] = []
