"""LoKr (LyCORIS): the Kronecker product of two (possibly low-rank) factors, added to the weight.

peft's delta is ``kron(w1, w2) * scaling`` with ``w1`` either ``lokr_w1`` or ``lokr_w1_a @
lokr_w1_b`` (the decomposed form) and ``w2`` likewise. Each element of a Kronecker product is one
multiply of an element of ``w1`` by one of ``w2``, so rows i..j need only the rows of ``w1`` they
come from: streamed. The factors themselves are small and computed whole, as peft computes them.
The CP-decomposed ``w2`` (``lokr_t2``, effective conv) exists for convolutions only, refused.
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import (
    Fetch,
    LayerFacts,
    refuse,
    refuse_unless_linear,
    refuse_unless_shaped,
)
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant


def _factor(delta: TunerDelta, which: str, device: torch.device | str) -> torch.Tensor:
    if f"lokr_{which}" in delta.tensors:
        return delta.tensor32(f"lokr_{which}", device)
    return delta.tensor32(f"lokr_{which}_a", device) @ delta.tensor32(f"lokr_{which}_b", device)


class LoKrVariant(Variant):
    """``kron(w1, w2) * scaling``, added; by rows (each block from the rows of w1 it needs)."""

    name = "lokr"

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        return (
            torch.kron(_factor(delta, "w1", device), _factor(delta, "w2", device).contiguous())
            * delta.scaling
        )

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        w1, w2 = _factor(delta, "w1", "cpu"), _factor(delta, "w2", "cpu").contiguous()
        height = w2.shape[0]

        def rows(i: int, j: int) -> torch.Tensor:
            first, last = i // height, -(-j // height)  # the rows of w1 that rows i..j come from
            block = torch.kron(w1[first:last], w2)
            offset = first * height
            return block[i - offset : j - offset].mul_(delta.scaling)

        return rows


LOKR = LoKrVariant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The LoKr delta of ``adapter`` on ``layer``."""
    refuse_unless_linear(layer, facts, "LoKr")
    if adapter in layer.lokr_t2:
        refuse(facts, "LoKr", "its CP-decomposed w2 (effective conv) applies to convolutions")
    tensors = {}
    for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
        holder = getattr(layer, key)
        if adapter in holder:
            tensors[key] = fetch(holder, adapter, key)
    refuse_unless_shaped(
        facts,
        "LoKr",
        (_rows(tensors, "w1") * _rows(tensors, "w2"), _columns(tensors, "w1") * _columns(tensors, "w2")),
    )
    return TunerDelta(adapter, LOKR, tensors, scaling=float(layer.scaling[adapter]))


def _rows(tensors: dict[str, torch.Tensor], which: str) -> int:
    whole = tensors.get(f"lokr_{which}")
    return int(whole.shape[0] if whole is not None else tensors[f"lokr_{which}_a"].shape[0])


def _columns(tensors: dict[str, torch.Tensor], which: str) -> int:
    whole = tensors.get(f"lokr_{which}")
    return int(whole.shape[1] if whole is not None else tensors[f"lokr_{which}_b"].shape[1])
