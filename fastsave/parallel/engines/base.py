"""What every sharding engine offers the save: its modules' full shapes, and one module gathered.

An engine (FSDP2, FSDP1, DeepSpeed ZeRO-3; one module each in this folder, registered in
``__init__.py``) says whether it shards a model, which modules are its wrappers, the full
(unsharded) shape and dtype of each of a module's own parameters, and gathers the parameters of
some modules whole on every rank with its own collective. :class:`Engine` itself is the unsharded
case: every parameter is whole, gathering it is reading it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleEntry:
    """One module that has parameters of its own, as the walk lists it.

    ``name`` is the module's name in the unsharded model ("" for the root); ``parameters`` its own
    parameters' local names (not its children's), ``shapes`` and ``dtypes`` their full (unsharded)
    shapes and dtypes, in the same order.
    """

    name: str
    module: nn.Module
    parameters: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    def full_name(self, parameter: str) -> str:
        """The parameter's name in the unsharded model's state dict."""
        return f"{self.name}.{parameter}" if self.name else parameter

    @property
    def nbytes(self) -> int:
        """Bytes the module's own parameters take when materialized whole."""
        return sum(
            math.prod(shape) * dtype.itemsize for shape, dtype in zip(self.shapes, self.dtypes, strict=True)
        )


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def own_parameters(modules: Sequence[nn.Module]) -> Iterator[torch.Tensor]:
    """Each module's own parameters (not its children's), read from its registry directly: the
    engines ask this of every save's model, and ``model.parameters()`` walked it once per engine
    (1.2 ms each for a 250M peft model, 1171 modules)."""
    for module in modules:
        for parameter in module._parameters.values():
            if parameter is not None:
                yield parameter


class Engine:
    """The unsharded case, and the interface of every sharding engine."""

    name = "none"

    @classmethod
    def shards(cls, modules: Sequence[nn.Module]) -> bool:
        """Whether this engine shards the parameters of a model whose modules are ``modules``
        (all of them, listed once for every engine: :func:`fastsave.parallel.engines.engine_class`)."""
        return False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- the walk ------------------------------------------------------------------------------

    def is_wrapper(self, module: nn.Module) -> bool:
        """A wrapper module the walk skips (its module is walked under the same clean name)."""
        return False

    def is_hidden(self, parameter: torch.Tensor) -> bool:
        """A parameter of the engine's own that the unsharded model does not have."""
        return False

    def full_shape(self, parameter: torch.Tensor) -> tuple[int, ...]:
        """The unsharded shape of one of the engine's parameters (a DTensor reports its global one)."""
        return tuple(parameter.shape)

    def own_parameters(self, module: nn.Module) -> Shapes:
        """``{name: (full shape, dtype)}`` of the module's own parameters, in registration order."""
        return {
            name: (self.full_shape(parameter), parameter.dtype)
            for name, parameter in module.named_parameters(recurse=False)
            if not self.is_hidden(parameter)
        }

    def identity(self, module: nn.Module, name: str) -> object:
        """What tells a tied parameter's owners apart from separate parameters (the same on every call)."""
        parameter = module._parameters.get(name)
        return id(parameter) if parameter is not None else (id(module), name)

    # -- gathering ------------------------------------------------------------------------------

    @contextmanager
    def gathered(self, entries: Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        """``{full name: whole tensor}`` of the entries' own parameters, valid inside the block.

        Collective for a sharding engine: every rank enters it for the same entries in the same order.
        """
        yield {e.full_name(p): getattr(e.module, p) for e in entries for p in e.parameters}

    def row_window(self, value: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of one parameter sent by the ranks that hold them, where the engine's
        layout allows it (collective); None: gather the parameter whole instead."""
        return None

    @contextmanager
    def holding(self, entries: Sequence[ModuleEntry]) -> Iterator[None]:
        """Keep ``entries`` gathered across the gathers inside the block (where an engine can only
        gather whole units); nothing to do for the others."""
        yield

    def keep_summoned(self, entries: Sequence[ModuleEntry]) -> None:
        """From now on keep the units that hold ``entries`` gathered (see :meth:`holding`)."""

    def release_summoned(self) -> None:
        """Release what :meth:`keep_summoned` kept."""
