"""The plan: every output tensor (name, shape, dtype, how to produce it), decided before any merge runs.

Knowing every tensor up front lets the writer lay out shards and safetensors headers before the
first merged byte exists, and lets the safety checks (fastsave.plan.checks) run before anything
is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from fastsave.sources.settings_4bit import Quant4bitSettings


@dataclass(slots=True)
class PlanItem:
    """One tensor of the output checkpoint.

    Attributes:
        name: its name in the checkpoint.
        shape, dtype: what the writer reserves for it.
        produce: computes it (output dtype, on the CPU, contiguous).
        lora_module: for the weight of a merged LoRA module, that module's name (the census).
        source_kind: where its values come from, for the save log.
        requantize: for save_method="merged_4bit_forced", the 4-bit settings the trained model held
            this weight in (None: it stays 16-bit).
        requantize_transposed: the checkpoint stores this weight transposed from the layout that is
            quantized (a Conv1D).
        checkpoint_named: the name is already the checkpoint's (a piece copied from a checkpoint on
            disk), so the layout step leaves it alone.
        stream: the tensor as consecutive pieces of its flattened values (fastsave.merge.dispatch),
            when it can be produced in pieces; the writer takes them one by one.
        working_bytes: memory held while producing it, beyond its output (the memory budget admits
            it): a number, or a function that estimates it when the item is produced (planning a
            model's every weight stays cheap); read it with :meth:`working_set`.
        planned_by: the walk unit (fastsave.plan.walk.walk_units) that planned it, when a walk did.
        participate: the collective operations producing it takes part in (the gathers of a sharded
            model), run instead of producing it by a rank that does not write it, so that every rank
            enters the same collectives in the same order; None: producing it involves none.
        group: the :class:`SharedProducer` that makes it together with other items, if any.
        holds_codes: its values are packed quantized codes stored in a floating dtype (bitsandbytes'
            ``bnb_4bit_quant_storage``, e.g. bfloat16), not numbers: the writer does not check them
            for NaN/Inf (random codes form NaN bit patterns).
        linear_weight: the weight of a linear layer (``nn.Linear`` and the quantized layers that
            stand for one): what a compressed-tensors save quantizes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor] = field(repr=False)
    lora_module: str | None = None
    source_kind: str = ""
    requantize: Quant4bitSettings | None = None
    requantize_transposed: bool = False
    checkpoint_named: bool = False
    stream: Callable[[], Iterator[torch.Tensor]] | None = field(default=None, repr=False)
    working_bytes: int | Callable[[], int] = field(default=0, repr=False)
    planned_by: str | None = None
    participate: Callable[[], None] | None = field(default=None, repr=False)
    group: SharedProducer | None = field(default=None, repr=False, compare=False)
    holds_codes: bool = False
    linear_weight: bool = False

    def pieces(self) -> Iterator[torch.Tensor]:
        """The tensor's values as consecutive pieces (one piece: the whole tensor, when it does not stream)."""
        if self.stream is not None:
            return self.stream()
        return iter([self.produce()])

    def working_set(self) -> int:
        """The bytes held while producing it, beyond its output."""
        return self.working_bytes() if callable(self.working_bytes) else self.working_bytes

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    """Everything the producer and writer need, decided before any weight is merged.

    Attributes:
        items: the output tensors in write order.
        dtype: the output dtype of floating tensors.
        census: every module holding LoRA weights of a selected adapter, found independently of
            the walk that built ``items`` (fastsave.plan.checks compares the two).
        untied_embeddings: tied input/output embeddings that the adapter made differ.
        also_merged: adapter modules merged into an item that names another: the second name of
            a tied weight whose change is the first side's (the same tensors merge both, written
            once), and the inner layers of tuners nested around one base layer (peft's mixed models).
        release: gives back what producing the items held at the end (a sharded model's last
            gathered module); called once the items are produced, also after an error.
    """

    items: list[PlanItem]
    dtype: torch.dtype
    census: list[str]
    untied_embeddings: bool = False
    release: Callable[[], None] | None = field(default=None, repr=False)
    also_merged: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the whole checkpoint."""
        return sum(item.nbytes for item in self.items)

    @property
    def merged_modules(self) -> list[str]:
        """The LoRA modules whose weight the plan merges."""
        return [item.lora_module for item in self.items if item.lora_module is not None] + self.also_merged

    def source_kinds(self) -> list[str]:
        """Where the merged weights come from, each kind once, for the save log."""
        kinds: list[str] = []
        for item in self.items:
            if item.lora_module is not None and item.source_kind not in kinds:
                kinds.append(item.source_kind)
        return kinds


class SharedProducer:
    """Produce functions for several plan items that one computation makes together.

    The first part asked for runs ``make`` (name -> tensor); each part is then handed out once.
    The producer asks for tensors in plan order and a group's parts stand together there, so only
    one group's parts are held at a time.

    When ranks share a save, a rank writes only some of the parts: :meth:`keep` names them (the
    others are dropped as soon as they are made), and a rank that writes none of them runs
    ``participate`` once instead of ``make`` (the collectives ``make`` would enter: the gathers of
    the members it is made from).
    """

    def __init__(
        self,
        make: Callable[[], dict[str, torch.Tensor]],
        participate: Callable[[], None] | None = None,
    ) -> None:
        self._make = make
        self._parts: dict[str, torch.Tensor] | None = None
        self._keep: set[str] | None = None
        self._done = False  # made, or took part: the group's collectives are behind this rank
        self.participate = participate

    def keep(self, names: set[str]) -> None:
        """Only the parts ``names`` will be asked for: the others are dropped as soon as they are made."""
        self._keep = set(names)

    def take_part(self) -> None:
        """Enter the collectives making the group still involves, without making it (none once made)."""
        if self._done:
            return
        self._done = True
        if self.participate is not None:
            self.participate()

    def part(self, name: str) -> Callable[[], torch.Tensor]:
        """The produce function of the part ``name``."""

        def produce() -> torch.Tensor:
            if self._parts is None:
                made = self._make()
                self._done = True
                self._parts = dict(made if self._keep is None else {k: made[k] for k in self._keep})
                del made
            tensor = self._parts.pop(name)
            if not self._parts:
                self._parts = None
            return tensor

        return produce

    def item(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, **fields: object) -> PlanItem:
        """The plan item of the part ``name`` (``fields``: other PlanItem fields)."""
        return PlanItem(name, shape, dtype, self.part(name), group=self, **fields)
