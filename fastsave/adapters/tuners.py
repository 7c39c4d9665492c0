"""The peft tuners fastsave merges besides LoRA, by peft's own package name, and their readers.

A peft tuner layer's class lives in ``peft.tuners.<tuner>``; the reader registered here under that
name turns one adapter on one layer into a :class:`~fastsave.adapters.delta.TunerDelta` (its
arithmetic is the variant in the tuner's module). A tuner layer with no reader here is refused by
name, with the reason (:data:`REFUSED`, or "not merged by fastsave" for one peft added later).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastsave.adapters import adalora, ia3, loha, lokr, peft_computed, trainable_tokens, vera
from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts

Reader = Callable[[torch.nn.Module, str, LayerFacts, Fetch], TunerDelta]

READERS: dict[str, Reader] = {
    "adalora": adalora.read,
    "ia3": ia3.read,
    "loha": loha.read,
    "lokr": lokr.read,
    "vera": vera.read,
    "trainable_tokens": trainable_tokens.read,
    **{tuner: peft_computed.reader(tuner) for tuner in peft_computed.TUNERS},
}

# peft tuners whose layers fastsave does not merge, and why (each is refused before anything is written)
REFUSED: dict[str, str] = peft_computed.REFUSED

# display names for messages
TITLES = {
    "adalora": "AdaLoRA",
    "ia3": "IA3",
    "loha": "LoHa",
    "lokr": "LoKr",
    "vera": "VeRA",
    "trainable_tokens": "trainable tokens",
    **peft_computed.TITLES,
}


def tuner_of(cls: type) -> str | None:
    """The peft tuner a layer class belongs to (``peft.tuners.<tuner>...``), or None."""
    parts = cls.__module__.split(".")
    return parts[2] if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else None


def title(tuner: str | None) -> str:
    """A tuner's name as people write it."""
    return TITLES.get(tuner or "", (tuner or "non-LoRA").upper())


def adapter_containers(tuner: str) -> tuple[str, ...]:
    """The names of the containers that hold a tuner's adapter tensors (peft's ``adapter_layer_names``
    of its layer class), or () when peft has no such layer."""
    import importlib

    try:
        module = importlib.import_module(f"peft.tuners.{tuner}.layer")
    except ImportError:
        return ()
    for value in vars(module).values():
        names = getattr(value, "adapter_layer_names", None)
        if isinstance(value, type) and names and getattr(value, "__module__", "") == module.__name__:
            return tuple(names)
    return ()
