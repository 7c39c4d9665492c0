"""What every tuner's reader gets and how it refuses: the facts of the layer, a way to read tensors.

A tuner module (fastsave.adapters.ia3, loha, ...) reads one adapter's tensors off a live peft layer
into a :class:`~fastsave.adapters.delta.TunerDelta`. It reads them through :data:`Fetch`, which
finds a tensor that accelerate offloaded (or keeps a placeholder of a sharded model planned from
shapes), and refuses, through :func:`refuse`, what it cannot merge exactly, naming why, before
anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastsave.errors import UnsupportedAdapterError

# (the holder (a ParameterDict, BufferDict or module), the key in it, the holder's name) -> tensor
Fetch = Callable[[object, str, str], torch.Tensor]


@dataclass(frozen=True)
class LayerFacts:
    """What a reader needs to know of the layer beyond its own tensors."""

    name: str  # the layer's name in the model, for messages
    base_shape: tuple[int, ...]  # the base weight's shape, in the layout the merge runs in
    has_base_bias: bool
    fan_in_fan_out: bool  # peft's Linear over a Conv1D-style (in, out) weight
    is_embedding: bool


def refuse(facts: LayerFacts, tuner: str, why: str) -> None:
    """Refuse this layer's adapter: ``why`` fastsave cannot merge it exactly.

    Raises:
        UnsupportedAdapterError: always, naming the layer, the tuner and the reason.
    """
    raise UnsupportedAdapterError(
        f"{facts.name}: fastsave cannot merge this {tuner} adapter: {why}. Nothing was written; save the "
        "adapter with save_method='lora' (peft's own files)"
    )


def refuse_unless_linear(layer: nn.Module, facts: LayerFacts, tuner: str) -> None:
    """Refuse a tuner layer that does not wrap a linear layer (a 2-D weight)."""
    if len(facts.base_shape) != 2 or facts.is_embedding or "conv" in type(layer).__name__.lower():
        refuse(
            facts, tuner, f"it wraps a {type(layer).__name__} layer; fastsave merges {tuner} on linear layers"
        )


def refuse_unless_shaped(facts: LayerFacts, tuner: str, shape: tuple[int, ...]) -> None:
    """Refuse a delta whose shape is not the weight's: peft built the adapter for another shape (a
    LyCORIS layer over a packed 4-bit weight takes the storage's (n, 1) for the weight's)."""
    if tuple(shape) != tuple(facts.base_shape):
        refuse(
            facts,
            tuner,
            f"peft built its factors for a {tuple(shape)} weight, but the layer's weight is {tuple(facts.base_shape)} "
            "(peft sizes this tuner from the stored tensor, which bitsandbytes packs); the adapter does not "
            "describe this model's weight, and peft cannot merge it either",
        )
