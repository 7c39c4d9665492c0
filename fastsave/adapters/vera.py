"""VeRA: shared frozen random projections A and B, scaled by two trained vectors.

peft's delta is ``transpose((lambda_b * B[:out]) @ (lambda_d * A[:, :in]), fan_in_fan_out)``
(lambda_b and lambda_d as columns; A and B shared by every layer, sliced to the layer's size).
Rows are rows of the first operand (columns with fan_in_fan_out), with the whole product's bits
(fastsave.merge.row_blocks.product_blocks).
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts, refuse_unless_linear
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant


class VeraVariant(Variant):
    """``(lambda_b * B) @ (lambda_d * A)``, added; by rows."""

    name = "vera"

    def _operands(self, delta: TunerDelta, device) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = delta.setting("out_features"), delta.setting("in_features")
        left = (
            delta.tensor32("lambda_b", device).unsqueeze(-1)
            * delta.tensor32("vera_B", device)[:out_features, :]
        )
        right = (
            delta.tensor32("lambda_d", device).unsqueeze(-1)
            * delta.tensor32("vera_A", device)[:, :in_features]
        )
        return left, right

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        left, right = self._operands(delta, device)
        product = left @ right
        return product.T if delta.fan_in_fan_out else product

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        left, right = self._operands(delta, "cpu")
        product = check.blocks(left, right, step, columns=delta.fan_in_fan_out)
        if not delta.fan_in_fan_out:
            return product
        return lambda i, j: product(i, j).T


VERA = VeraVariant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The VeRA delta of ``adapter`` on ``layer``."""
    refuse_unless_linear(layer, facts, "VeRA")
    tensors = {
        "vera_A": fetch(layer.vera_A, adapter, "vera_A"),
        "vera_B": fetch(layer.vera_B, adapter, "vera_B"),
        "lambda_b": fetch(layer.vera_lambda_b, adapter, "vera_lambda_b"),
        "lambda_d": fetch(layer.vera_lambda_d, adapter, "vera_lambda_d"),
    }
    sizes = {"in_features": int(layer.in_features), "out_features": int(layer.out_features)}
    return TunerDelta(adapter, VERA, tensors, fan_in_fan_out=facts.fan_in_fan_out, settings=sizes)
