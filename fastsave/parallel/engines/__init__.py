"""The sharding engines a collective save reads, one module each; a new engine is one module and
one entry in :data:`ENGINES`."""

from __future__ import annotations

from torch import nn

from fastsave.errors import ShardingError
from fastsave.parallel.engines.base import Engine, ModuleEntry
from fastsave.parallel.engines.fsdp1 import Fsdp1
from fastsave.parallel.engines.fsdp2 import Fsdp2
from fastsave.parallel.engines.zero3 import Zero3

__all__ = ["ENGINES", "Engine", "ModuleEntry", "engine_of"]

ENGINES: tuple[type[Engine], ...] = (Fsdp2, Fsdp1, Zero3)


def engine_class(model: nn.Module) -> type[Engine]:
    """The engine that shards ``model`` (``Engine`` itself when none does).

    Raises:
        ShardingError: more than one engine shards it.
    """
    modules = list(model.modules())  # walked once for every engine
    found = [engine for engine in ENGINES if engine.shards(modules)]
    if len(found) > 1:
        names = ", ".join(sorted(engine.name for engine in found))
        raise ShardingError(
            f"the model is sharded by more than one engine ({names}); fastsave reads one at a time. "
            "Save from a model wrapped by one of them."
        )
    return found[0] if found else Engine


def engine_of(model: nn.Module) -> Engine:
    """The engine that shards ``model``, set up to read it (see :func:`engine_class`)."""
    return engine_class(model)(model)
