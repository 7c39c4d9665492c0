"""FSDP1 (``FullyShardedDataParallel``): each unit's parameters flattened into one FlatParameter,
gathered a whole unit at a time with ``summon_full_params``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from fastsave.parallel.engines.base import Engine, ModuleEntry, Shapes


def fsdp1_class() -> type | None:
    """torch's FullyShardedDataParallel, where this torch has it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _is_flat_parameter(parameter: torch.Tensor) -> bool:
    try:
        from torch.distributed.fsdp import FlatParameter
    except ImportError:
        return False
    return isinstance(parameter, FlatParameter)


class Fsdp1(Engine):
    """Units summoned whole (the wrap policy's granularity, typically a decoder layer)."""

    name = "fsdp1"

    @classmethod
    def shards(cls, modules: Sequence[nn.Module]) -> bool:
        fsdp1 = fsdp1_class()
        return fsdp1 is not None and any(isinstance(m, fsdp1) for m in modules)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # Which FSDP unit holds each (module, parameter name); per module, the full shape and dtype
        # of each of its parameters (modules keyed by id: they are not hashable by value and the
        # model outlives this object); a tied parameter's later owners -> its first owner.
        self._units: dict[tuple[int, str], nn.Module] = {}
        self._meta: dict[int, Shapes] = {}
        self._shared: dict[tuple[int, str], tuple[int, str]] = {}
        self._held: list[nn.Module] = []  # units kept summoned by holding() / keep_summoned()
        self._kept: dict[int, ExitStack] = {}  # keep_summoned(): id(unit) -> its summon
        # FSDP1 flattens a unit's parameters into one FlatParameter and (without use_orig_params)
        # removes them from their modules; the FlatParameter's records say where each came from.
        fsdp1 = fsdp1_class()
        for root in fsdp1.fsdp_modules(self.model, root_only=True):
            root.check_is_root()  # lazy init from the real root before summoning an inner unit
        for unit in fsdp1.fsdp_modules(self.model):
            flat = unit._flat_param  # the FlatParameter of this unit (None if it manages none)
            if flat is None:
                continue
            for info, shape in zip(flat._param_infos, flat._shapes, strict=True):
                self._units[(id(info.module), info.param_name)] = unit
                self._meta.setdefault(id(info.module), {})[info.param_name] = (tuple(shape), flat.dtype)
            for shared in flat._shared_param_infos:  # a tied parameter's second (third...) owner
                self._units[(id(shared.module), shared.param_name)] = unit
                self._shared[(id(shared.module), shared.param_name)] = (
                    id(shared.prim_module),
                    shared.prim_param_name,
                )
                meta = self._meta[id(shared.prim_module)][shared.prim_param_name]
                self._meta.setdefault(id(shared.module), {})[shared.param_name] = meta

    # -- the walk ------------------------------------------------------------------------------

    def is_wrapper(self, module: nn.Module) -> bool:
        return isinstance(module, fsdp1_class())

    def is_hidden(self, parameter: torch.Tensor) -> bool:
        return _is_flat_parameter(parameter)

    def own_parameters(self, module: nn.Module) -> Shapes:
        own = super().own_parameters(module)  # the registered ones, a unit's flat buffer left out
        flattened = self._meta.get(id(module), {})
        # with use_orig_params a registered parameter is a view of this rank's slice: its full shape
        # is the FlatParameter's record; without, the flattened ones are not registered now
        own.update((name, meta) for name, meta in flattened.items() if name in own)
        for name, meta in flattened.items():
            own.setdefault(name, meta)
        return own

    def identity(self, module: nn.Module, name: str) -> object:
        return self._shared.get((id(module), name), (id(module), name))

    # -- gathering ------------------------------------------------------------------------------

    def _units_of(self, entries: Sequence[ModuleEntry]) -> list[nn.Module]:
        units: list[nn.Module] = []  # distinct units, in first-use order (identical on every rank)
        for entry in entries:
            for name in entry.parameters:
                unit = self._units.get((id(entry.module), name))
                if unit is not None and all(unit is not u for u in units):
                    units.append(unit)
        return units

    def _summon(self, unit: nn.Module):
        return fsdp1_class().summon_full_params(unit, recurse=False, writeback=False)

    @contextmanager
    def gathered(self, entries: Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        units = [u for u in self._units_of(entries) if all(u is not h for h in self._held)]
        with ExitStack() as stack:
            for unit in units:
                stack.enter_context(self._summon(unit))
            out = {e.full_name(p): getattr(e.module, p).detach() for e in entries for p in e.parameters}
            try:
                yield out
            finally:
                out.clear()

    @contextmanager
    def holding(self, entries: Sequence[ModuleEntry]) -> Iterator[None]:
        """Summon the units of ``entries`` once for all the gathers inside the block (same peak
        memory: a unit is the floor under FSDP1; far fewer collectives). Not nested for one unit."""
        units = [u for u in self._units_of(entries) if all(u is not h for h in self._held)]
        with ExitStack() as stack:
            for unit in units:
                stack.enter_context(self._summon(unit))
            self._held.extend(units)
            try:
                yield
            finally:
                del self._held[len(self._held) - len(units) :]

    def keep_summoned(self, entries: Sequence[ModuleEntry]) -> None:
        """Keep exactly the units that hold ``entries`` summoned: units no longer needed are
        released, the missing ones summoned (first-use order)."""
        needed = self._units_of(entries)
        for key in [k for k in self._kept if all(id(u) != k for u in needed)]:
            stack = self._kept.pop(key)
            self._held[:] = [u for u in self._held if id(u) != key]
            stack.close()
        for unit in needed:
            if id(unit) in self._kept:
                continue
            stack = ExitStack()
            stack.enter_context(self._summon(unit))
            self._kept[id(unit)] = stack
            self._held.append(unit)

    def release_summoned(self) -> None:
        """Release every unit :meth:`keep_summoned` kept (local: resharding needs no collective)."""
        while self._kept:
            key, stack = self._kept.popitem()
            self._held[:] = [u for u in self._held if id(u) != key]
            stack.close()
