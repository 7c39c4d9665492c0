"""Where the values of each output tensor come from: one module per backend.

``module_tensors(module)`` is the one place that decides, from what a module and its tensors are,
which source gives each of the module's own tensors and under which name the checkpoint stores it.
A new quantization backend of linear layers is one new module here, describing its layer with a
:class:`~fastsave.sources.backends.QuantizedLinear`, plus one ``register`` line below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastsave.sources import bnb_4bit, bnb_8bit, hqq
from fastsave.sources.backends import backend_of, register
from fastsave.sources.base import RowReader, Source
from fastsave.sources.dense import DenseSource
from fastsave.sources.torchao import TorchaoSource, is_torchao_tensor

register(bnb_4bit.BACKEND)
register(bnb_8bit.BACKEND)
register(hqq.BACKEND)

__all__ = ["ModuleTensor", "RowReader", "Source", "module_compute_dtype", "module_tensors"]


@dataclass(slots=True)
class ModuleTensor:
    """One of a module's own tensors as the checkpoint stores it.

    Attributes:
        attr: its name under the module in the checkpoint ("weight", "bias", a buffer's name).
        tensor: the parameter or buffer object the model holds (its identity tells tied weights
            apart; it is on the meta device when the values live elsewhere).
        source: where the values come from; None for a meta tensor, which the save's input resolves.
        transposed: the checkpoint stores the transpose of the compute layout (a Conv1D weight that
            transformers quantized as a Linear).
        without_merged_adapters: the source holds the base weight before any adapter was merged into
            it (a checkpoint on disk), so adapters the model had already merged are added again.
    """

    attr: str
    tensor: torch.Tensor
    source: Source | None
    transposed: bool = False
    without_merged_adapters: bool = False

    def with_source(self, source: Source) -> ModuleTensor:
        """The same tensor read from ``source`` (dataclasses.replace's result, at a fraction of its
        cost: resolvers call this once per tensor of the model)."""
        return ModuleTensor(self.attr, self.tensor, source, self.transposed, self.without_merged_adapters)


def _tensor_source(tensor: torch.Tensor) -> Source | None:
    if tensor.device.type == "meta":
        return None
    if is_torchao_tensor(tensor):
        return TorchaoSource(tensor)
    return DenseSource(tensor)


def quantized_weight_source(module: nn.Module) -> Source | None:
    """The source of a quantized linear's weight (any registered backend), or None for any other module."""
    backend = backend_of(module)
    return backend.source(module) if backend is not None else None


def module_tensors(
    module: nn.Module, persistent_buffers: bool = True, meta_ok: bool = False
) -> list[ModuleTensor]:
    """The module's own tensors (not its children's) under their checkpoint names, each with its source.

    A quantized linear gives ``weight`` (from its codes, whatever attribute holds them) and ``bias``;
    any other module gives its parameters and, with ``persistent_buffers``, its persistent buffers.
    ``meta_ok``: the walk plans shapes only (a sharded model's placeholders), so a quantized weight
    on the meta device is described, not refused.
    """
    backend = backend_of(module)
    if backend is not None:
        weight = backend.source(module)
        if weight.device.type == "meta" and not meta_ok:
            raise ValueError("a quantized weight on the meta device cannot be read")
        tensors = [ModuleTensor("weight", backend.weight(module), weight, backend.transposed(module))]
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors.append(ModuleTensor("bias", bias, _tensor_source(bias)))
        return tensors
    # the module's own dicts, as named_parameters(recurse=False) reads them (without its generator
    # machinery: this runs for every module of the model), each tensor once under its first name
    seen: set[int] = set()
    tensors = []
    for attr, p in module._parameters.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            tensors.append(ModuleTensor(attr, p, _tensor_source(p)))
    if persistent_buffers and module._buffers:
        non_persistent = module._non_persistent_buffers_set
        for attr, buffer in module._buffers.items():
            if attr not in non_persistent and buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                tensors.append(ModuleTensor(attr, buffer, _tensor_source(buffer)))
    return tensors


def module_compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype a quantized module's weight stands for, or None for a plain module."""
    backend = backend_of(module)
    if backend is not None:
        return backend.compute_dtype(module)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and is_torchao_tensor(weight):
        return weight.dtype
    return None
