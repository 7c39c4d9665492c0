"""Quantization backends of linear layers: each is one module in fastsave/sources/ that describes
its layer with a :class:`QuantizedLinear`, and one ``register`` line in fastsave/sources/__init__.py.

The plan (``module_tensors``), the output dtype and peft's LoRA layers over the backend's layers
(fastsave.adapters.live_peft) all ask this registry; nothing else names a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastsave.sources.base import Source


@dataclass(frozen=True)
class QuantizedLinear:
    """What fastsave needs to read one backend's quantized linear layer.

    Attributes:
        name: the backend's name, for messages.
        layer_classes: the backend's layer classes (empty when its library is not installed).
        holds_quantized: whether a layer of those classes holds a quantized weight now.
        source: the weight's source (its values in float32, rows on demand where it can).
        compute_dtype: the 16-bit dtype the layer's weight stands for.
        weight: the tensor object that identifies the weight (tied weights are told apart by it).
        transposed: the checkpoint stores the weight transposed (a Conv1D transformers quantized).
        lora_layer_classes: peft's LoRA layer classes over this backend's layers (delta B @ A).
    """

    name: str
    layer_classes: tuple[type, ...]
    holds_quantized: Callable[[nn.Module], bool]
    source: Callable[[nn.Module], Source]
    compute_dtype: Callable[[nn.Module], torch.dtype | None]
    weight: Callable[[nn.Module], torch.Tensor] = lambda module: module.weight
    transposed: Callable[[nn.Module], bool] = lambda module: False
    lora_layer_classes: tuple[type, ...] = ()


def optional_classes(*where: tuple[str, str]) -> tuple[type, ...]:
    """The classes ``(module path, name)`` that can be imported here (a library may be absent)."""
    found = []
    for module_path, name in where:
        try:
            module = __import__(module_path, fromlist=[name])
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


_BACKENDS: list[QuantizedLinear] = []
# The backend of each module class, decided once per class: planning asks for every module.
_BACKEND_OF_CLASS: dict[type, QuantizedLinear | None] = {}


def register(backend: QuantizedLinear) -> None:
    """Make fastsave read ``backend``'s layers (tried in registration order)."""
    _BACKENDS.append(backend)
    _BACKEND_OF_CLASS.clear()


def unregister(backend: QuantizedLinear) -> None:
    """Undo :func:`register` (tests register toy backends)."""
    _BACKENDS.remove(backend)
    _BACKEND_OF_CLASS.clear()


def backend_of(module: nn.Module) -> QuantizedLinear | None:
    """The backend whose quantized weight ``module`` holds, or None for any other module."""
    cls = type(module)
    if cls not in _BACKEND_OF_CLASS:
        _BACKEND_OF_CLASS[cls] = next((b for b in _BACKENDS if issubclass(cls, b.layer_classes)), None)
    backend = _BACKEND_OF_CLASS[cls]
    return backend if backend is not None and backend.holds_quantized(module) else None


def lora_layer_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes over every registered backend's layers."""
    return tuple(cls for backend in _BACKENDS for cls in backend.lora_layer_classes)
