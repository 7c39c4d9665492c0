"""IA3: a learned scale per output row (attention) or per input column (feed-forward), and the bias.

peft's merge is ``W * transpose(ia3_l, fan_in_fan_out)`` (ia3_l is (out, 1), or (1, in) for a
feed-forward layer) and, for a non-feed-forward layer with a bias, ``bias * ia3_l``. Each merged
element is one float32 multiply of its own weight and scale, so any block of rows gives the whole
matrix's bits: streamed.
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts, refuse_unless_linear
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant


class IA3Variant(Variant):
    """``W * l`` by rows (l broadcast over the weight's rows or columns); the bias scaled too."""

    name = "ia3"

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        scale = delta.tensor32("ia3_l", device)
        return scale.T if delta.fan_in_fan_out else scale

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        scale = self.dense(delta, "cpu")
        if scale.shape[0] == 1:  # one scale a column: the same for every block
            return lambda i, j: scale
        return lambda i, j: scale[i:j]

    def fold(self, delta, base, current, dense, rows=None):
        return current.mul_(dense)

    def changes_bias(self, delta: TunerDelta) -> bool:
        return not delta.setting("feedforward")

    def fold_bias(self, delta: TunerDelta, bias: torch.Tensor) -> torch.Tensor:
        return bias.mul_(delta.tensor32("ia3_l", bias.device).reshape(bias.shape))


IA3 = IA3Variant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The IA3 delta of ``adapter`` on ``layer``."""
    refuse_unless_linear(layer, facts, "IA3")
    scale = fetch(layer.ia3_l, adapter, "ia3_l")
    return TunerDelta(
        adapter,
        IA3,
        {"ia3_l": scale},
        fan_in_fan_out=facts.fan_in_fan_out,
        settings={"feedforward": bool(layer.is_feedforward)},
    )
