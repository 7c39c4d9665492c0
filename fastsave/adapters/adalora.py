"""AdaLoRA: LoRA in SVD form, ``B @ (A * E)``, scaled by ``scaling / (ranknum + 1e-5)``.

peft's delta is ``transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)``, ranknum
a float32 tensor. Rows of it are rows of ``B`` times ``A * E`` (columns with fan_in_fan_out), with
the whole product's bits (fastsave.merge.row_blocks.product_blocks).
The pruned singular values are zeros in E: nothing special to do.
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts, refuse_unless_linear
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant


class AdaLoraVariant(Variant):
    """``transpose(B @ (A * E)) * scaling / (ranknum + 1e-5)``, added; by rows."""

    name = "adalora"

    def _parts(self, delta: TunerDelta, device):
        a_e = delta.tensor32("lora_A", device) * delta.tensor32("lora_E", device)
        return delta.tensor32("lora_B", device), a_e, delta.tensor32("ranknum", device) + 1e-5

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        b, a_e, denominator = self._parts(delta, device)
        product = b @ a_e
        return (product.T if delta.fan_in_fan_out else product) * delta.scaling / denominator

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        b, a_e, denominator = self._parts(delta, "cpu")
        scaling = delta.scaling
        product = check.blocks(b, a_e, step, columns=delta.fan_in_fan_out)
        if not delta.fan_in_fan_out:
            return lambda i, j: product(i, j).mul_(scaling).div_(denominator)
        return lambda i, j: product(i, j).T.mul_(scaling).div_(denominator)


ADALORA = AdaLoraVariant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The AdaLoRA delta of ``adapter`` on ``layer``."""
    refuse_unless_linear(layer, facts, "AdaLoRA")
    tensors = {key: fetch(getattr(layer, key), adapter, key) for key in ("lora_A", "lora_B", "lora_E")}
    ranknum = layer.ranknum[adapter]
    # peft fills ranknum with the layer's rank and does not save it: an adapter read from disk onto
    # the meta device takes it from ``r``, as peft's own update_layer sets it
    tensors["ranknum"] = ranknum if not ranknum.is_meta else torch.full((1,), float(layer.r[adapter]))
    return TunerDelta(
        adapter, ADALORA, tensors, scaling=float(layer.scaling[adapter]), fan_in_fan_out=facts.fan_in_fan_out
    )
