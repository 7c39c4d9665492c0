"""peft's trainable tokens: the trained rows of chosen token ids replace the embedding's rows.

peft's merge is ``W.index_copy(0, token_indices, delta)``, the delta cast to the weight's dtype (in
the float32 merge, kept as trained), adapter after adapter. A block of rows takes the trained rows
whose ids fall in it: streamed. On a model with tied embeddings peft puts a second layer on the
output embedding that shares the first one's delta; both merge to the same weight.
"""

from __future__ import annotations

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts, refuse
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant


class TrainableTokensVariant(Variant):
    """Rows ``token_indices`` replaced by the trained rows; by rows."""

    name = "trainable tokens"

    def dense(self, delta: TunerDelta, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(delta.setting("token_indices"), dtype=torch.long, device=device)
        return index, delta.tensor32("trainable_tokens_delta", device)

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows:
        index, values = self.dense(delta, "cpu")

        def rows(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            inside = (index >= i) & (index < j)
            return index[inside] - i, values[inside]

        return rows

    def fold(self, delta, base, current, dense, rows=None):
        index, values = dense
        return current.index_copy_(0, index, values) if index.numel() else current


TRAINABLE_TOKENS = TrainableTokensVariant()


def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
    """The trainable tokens of ``adapter`` on ``layer`` (an embedding, or a tied output embedding)."""
    if len(facts.base_shape) != 2:
        refuse(facts, "trainable tokens", f"it wraps a {len(facts.base_shape)}-D weight")
    indices = [int(i) for i in layer.token_indices[adapter]]
    if len(set(indices)) != len(indices):
        refuse(facts, "trainable tokens", "the same token id is listed twice")
    if indices and not 0 <= min(indices) <= max(indices) < facts.base_shape[0]:
        refuse(facts, "trainable tokens", f"token ids {indices} fall outside the {facts.base_shape[0]} rows")
    values = fetch(layer.trainable_tokens_delta, adapter, "trainable_tokens_delta")
    return TunerDelta(
        adapter,
        TRAINABLE_TOKENS,
        {"trainable_tokens_delta": values},
        settings={"token_indices": indices},
        kind="embedding",
    )
