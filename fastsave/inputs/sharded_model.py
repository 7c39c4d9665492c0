"""A trained model sharded across ranks (FSDP2, FSDP1, DeepSpeed ZeRO-3), saved by every rank together.

Each rank holds a slice of every weight, so no rank can read a weight alone. The save is
collective: every rank of the process group calls ``save_pretrained_merged`` and every rank builds
the same plan; then each module's parameters are gathered whole, one walk unit at a time (a LoRA
layer with its base layer and adapters, or a plain module's own parameters), on every rank and in
plan order, with the sharding engine's own collective (fastsave.sources.sharded). The rank that
writes a tensor plans that unit again on the gathered tensors (fastsave.plan.walk.plan_unit: the
same walk, sources, deltas and merge dispatcher as any live model) and produces it; the other
ranks only take part in the gather. No rank holds more than one unit beyond its own shard (for
FSDP1, the FSDP units that hold it: its wrap policy's granularity).

Planning needs no values: it runs the one plan walk over the model with its parameters replaced
by meta placeholders of their full shapes (``ShardedModel.placeholders``), so the names, shapes,
dtypes, LoRA census, tied weights and every adapter check are those of the unsharded model, with
no communication at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fastsave.errors import PlanError
from fastsave.inputs.live_model import InMemoryResolver, LiveModelInput
from fastsave.merge.assemble import BLOCK_BYTES
from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.plan.checks import check_plan
from fastsave.plan.dtype import output_dtype
from fastsave.plan.items import Plan, PlanItem
from fastsave.plan.walk import plan_unit, walk_model, walk_units
from fastsave.sources import ModuleTensor
from fastsave.sources.dense import DenseSource
from fastsave.sources.sharded import ModuleEntry, ShardedModel, clean_name, detect_sharding, unwrap


def lora_save_refused() -> PlanError:
    """The error for ``save_method="lora"`` on a sharded model: peft's adapter save reads the
    sharded tensors as they are."""
    return PlanError(
        "save_method='lora' is not supported for a sharded (FSDP / ZeRO-3) model by fastsave: save the "
        "adapter with your trainer's own state-dict gathering (accelerate's get_state_dict, "
        "FSDP's full state dict for the LoRA parameters), or save it merged here (merged_16bit)"
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded across ranks (FSDP2, FSDP1, ZeRO-3): a collective save."""
    return detect_sharding(model) != "none"


class PlaceholderResolver:
    """While planning on placeholders: a meta tensor is described by its shape and dtype."""

    def resolve(self, name: str, module: nn.Module, entry: ModuleTensor, merged: bool) -> ModuleTensor:
        """``entry``, a placeholder given a shape-only source."""
        if entry.source is None:
            return replace(entry, source=DenseSource(entry.tensor))
        return entry


class _UnitGathers:
    """The one walk unit whose parameters are gathered now, and its items planned again from them.

    Every rank asks for the units in the same order (producing a tensor, or only taking part in its
    gather); moving to another unit releases the previous one first. Consecutive tensors of one unit
    share one gather.
    """

    def __init__(
        self,
        sharded: ShardedModel,
        units: dict[str, tuple[nn.Module, list[ModuleEntry]]],
        dtype: torch.dtype,
        adapter_names: Any,
    ) -> None:
        self.sharded = sharded
        self.units = units
        self.dtype = dtype
        self.adapter_names = adapter_names
        self.resolver = InMemoryResolver()
        self._unit: str | None = None
        self._stack: ExitStack | None = None
        self._items: dict[str, PlanItem] = {}
        self._storages: set[int] = set()

    def enter(self, unit: str) -> None:
        """Gather ``unit`` (collective) unless it is the one gathered now; release the previous one."""
        if unit == self._unit:
            return
        self.release()
        module, entries = self.units[unit]
        stack = ExitStack()
        try:
            self.sharded.keep_summoned(entries)  # FSDP1: a decoder layer summoned once for its modules
            tensors = stack.enter_context(self.sharded.materialized(entries))
            self._storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
            self._unit, self._stack = unit, stack
            items = plan_unit(unit, module, self.resolver, self.dtype, self.adapter_names)
        except BaseException:
            self.release()
            stack.close()
            raise
        self._items = {item.name: item for item in items}

    def release(self) -> None:
        """Give back the unit gathered now (its whole tensors are freed)."""
        self._items = {}
        self._storages = set()
        self._unit = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def close(self) -> None:
        """Release everything held, FSDP1 units kept summoned included."""
        self.release()
        self.sharded.release_summoned()

    def _item(self, unit: str, planned: PlanItem) -> PlanItem:
        self.enter(unit)
        item = self._items.get(planned.name)
        if item is None or item.shape != planned.shape or item.dtype != planned.dtype:
            found = "nothing" if item is None else f"{item.shape} {item.dtype}"
            raise PlanError(
                f"{planned.name}: planned as {planned.shape} {planned.dtype}, but the gathered module gives "
                f"{found}; the model changed between planning and saving"
            )
        return item

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        # a piece that is a view of a gathered parameter must outlive the gather (FSDP1 frees it in place)
        if tensor.untyped_storage().data_ptr() in self._storages:
            return tensor.clone()
        return tensor

    def produce(self, unit: str, planned: PlanItem) -> torch.Tensor:
        """The whole tensor ``planned``, from its unit gathered."""
        return self._own(self._item(unit, planned).produce())

    def pieces(self, unit: str, planned: PlanItem) -> Iterator[torch.Tensor]:
        """The tensor ``planned`` in pieces, from its unit gathered."""
        for piece in self._item(unit, planned).pieces():
            yield self._own(piece)


class ShardedModelInput(LiveModelInput):
    """A peft model sharded by FSDP2, FSDP1 or ZeRO-3, saved collectively by every rank.

    Attributes:
        team: every rank of the default process group.
        sharded: the model's modules and their gathers (fastsave.sources.sharded).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        model = unwrap(model)  # a DeepSpeed engine: its module
        super().__init__(model, tokenizer)
        self.sharded = ShardedModel(model)
        self.team = SaveTeam.of_process_group()
        self._gathers: _UnitGathers | None = None

    def signature(self) -> object:
        """What every rank must hold identically besides the plan: the modules and their full shapes."""
        return self.sharded.walk_signature()

    def _root_prefix(self) -> str:
        for name, module in self.sharded.model.named_modules():
            if module is self.root:
                cleaned = clean_name(name)
                return f"{cleaned}." if cleaned else ""
        raise PlanError("the model's transformers model was not found inside the sharded model")

    def merged_plan(self, opts: SaveOptions) -> Plan:
        """The checked merged plan, planned on placeholders; its items gather their unit when produced.

        Raises:
            PlanError: base_weights="original" (not for a sharded model), nothing to merge, an adapter
                or a weight fastsave cannot merge exactly.
        """
        if opts.base_weights == "original":
            raise PlanError(
                "base_weights='original' is not supported for a sharded (FSDP / ZeRO-3) model: save it with "
                "base_weights='dequantized', or save the adapter (save_method='lora' from an unsharded copy) "
                "and merge it with `torchrun --nproc-per-node N -m fastsave merge ADAPTER OUT "
                "--base-weights original`"
            )
        prefix = self._root_prefix()
        with self.sharded.placeholders():
            census = self.census(opts)
            dtype = output_dtype(self.root, opts.dtype)
            plan = walk_model(
                self.root, PlaceholderResolver(), dtype, opts.adapter_names, census, shapes_only=True
            )
            check_plan(plan)
            units = {}
            for name, module, whole in walk_units(self.root):
                full = prefix + name if name else prefix.rstrip(".")
                if whole:
                    entries = self.sharded.subtree(full)
                else:
                    entries = [e for e in self.sharded.entries() if e.name == full]
                units[name] = (module, entries)
        self._gathers = gathers = _UnitGathers(self.sharded, units, dtype, opts.adapter_names)
        items = []
        for item in plan.items:
            unit = item.planned_by
            gathered = sum(e.nbytes for e in units[unit][1])
            items.append(
                replace(
                    item,
                    produce=_bound(gathers.produce, unit, item),
                    stream=_bound(gathers.pieces, unit, item),
                    participate=_bound(gathers.enter, unit),
                    working_bytes=gathered + 3 * BLOCK_BYTES,  # the gathered unit and a row block's work
                )
            )
        return replace(plan, items=items, release=gathers.close)

    def write_adapter(self, directory: Any, opts: SaveOptions) -> list[str]:
        """Refused: peft's adapter save reads the sharded tensors as they are.

        Raises:
            PlanError: always, saying what to do instead.
        """
        raise lora_save_refused()

    def describe(self, plan: Plan) -> str:
        """What the adapters were merged into, and how the model was sharded."""
        return f"{super().describe(plan)}, gathered module by module from {self.sharded.kind} shards"


def _bound(function: Any, *args: Any) -> Any:
    """``function`` with ``args`` bound (a closure per plan item; a lambda in a loop would share them)."""
    return lambda: function(*args)
