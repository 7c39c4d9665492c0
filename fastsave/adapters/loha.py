"""LoHa (LyCORIS): the Hadamard product of two low-rank products, added to the weight.

peft's delta is ``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale`` (scale: the float32 scalar tensor of
``scaling``). Rows i..j of it are ``(w1_a[i:j] @ w1_b) * (w2_a[i:j] @ w2_b) * scale``, each product's
rows with its whole product's bits (fastsave.merge.row_blocks.product_blocks). The
CP-decomposed form (``use_effective_conv2d``) exists for convolutions only, which are refused.
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

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaVariant(Variant):
    """``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale``, added; by rows."""

    name = "loha"

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (delta.tensor32(key, device) for key in _KEYS)
        scale = torch.tensor(delta.scaling, device=device)  # peft multiplies by a float32 scalar tensor
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        w1a, w1b, w2a, w2b = (delta.tensor32(key) for key in _KEYS)
        first, second = check.blocks(w1a, w1b, step), check.blocks(w2a, w2b, step)
        scale = torch.tensor(delta.scaling)
        return lambda i, j: first(i, j).mul_(second(i, j)).mul_(scale)


LOHA = LoHaVariant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The LoHa delta of ``adapter`` on ``layer``."""
    refuse_unless_linear(layer, facts, "LoHa")
    if adapter in layer.hada_t1:
        refuse(facts, "LoHa", "its CP-decomposed (effective conv) form applies to convolutions")
    tensors = {key: fetch(getattr(layer, key), adapter, key) for key in _KEYS}
    refuse_unless_shaped(facts, "LoHa", (tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]))
    return TunerDelta(adapter, LOHA, tensors, scaling=float(layer.scaling[adapter]))
