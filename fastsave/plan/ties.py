"""Tied weights: one parameter object under two names (input and output embeddings, T5's shared)."""

from __future__ import annotations

import torch


class TiedWeights:
    """Which tensors are written when one parameter object sits under two names.

    Identical tied tensors are written once (under the first name) and stay tied; when an adapter
    changes one side, both are written and the checkpoint must say the embeddings are untied
    (otherwise the reloaded or GGUF-converted model silently uses the wrong head). Both sides
    changed by the very same tensors (peft's trainable tokens on tied embeddings share one delta)
    are still identical: written once, still tied.

    A change is False (none), True (one no other side can share: a trained copy), or a key naming
    the tensors that make it (fastsave.adapters.delta.change_key).
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, object]] = {}  # id(tensor) -> (output name, its change)
        self.untied = False

    def should_write(self, name: str, tensor: torch.Tensor, modified: bool | tuple) -> bool:
        """Record ``tensor`` under ``name``; False when it duplicates a written tensor, changed alike."""
        key = id(tensor)
        if key in self._seen:
            _, first_modified = self._seen[key]
            if not first_modified and not modified:
                return False
            if isinstance(modified, tuple) and modified == first_modified:
                return False  # the same tensors change both sides
            self.untied = True
        else:
            self._seen[key] = (name, modified)
        return True
