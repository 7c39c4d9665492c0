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

from fastsave.sources.bnb_4bit import Quant4bitSettings


@dataclass
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
        working_bytes: memory held while producing it, beyond its output (the memory budget admits it).
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
    working_bytes: int = 0

    def pieces(self) -> Iterator[torch.Tensor]:
        """The tensor's values as consecutive pieces (one piece: the whole tensor, when it does not stream)."""
        if self.stream is not None:
            return self.stream()
        return iter([self.produce()])

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Plan:
    """Everything the producer and writer need, decided before any weight is merged.

    Attributes:
        items: the output tensors in write order.
        dtype: the output dtype of floating tensors.
        census: every module holding LoRA weights of a selected adapter, found independently of
            the walk that built ``items`` (fastsave.plan.checks compares the two).
        untied_embeddings: tied input/output embeddings that the adapter made differ.
        tied_written_once: (kept name, dropped name) for tied tensors written once.
    """

    items: list[PlanItem]
    dtype: torch.dtype
    census: list[str]
    untied_embeddings: bool = False
    tied_written_once: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the whole checkpoint."""
        return sum(item.nbytes for item in self.items)

    @property
    def merged_modules(self) -> list[str]:
        """The LoRA modules whose weight the plan merges."""
        return [item.lora_module for item in self.items if item.lora_module is not None]

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
    """

    def __init__(self, make: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._make = make
        self._parts: dict[str, torch.Tensor] | None = None

    def part(self, name: str) -> Callable[[], torch.Tensor]:
        """The produce function of the part ``name``."""

        def produce() -> torch.Tensor:
            if self._parts is None:
                self._parts = dict(self._make())
            tensor = self._parts.pop(name)
            if not self._parts:
                self._parts = None
            return tensor

        return produce
