"""Tied weights: one parameter object under two names (input and output embeddings, T5's shared)."""

from __future__ import annotations

import torch


class TiedWeights:
    """Which tensors are written when one parameter object sits under two names.

    Identical tied tensors are written once (under the first name) and stay tied; when an adapter
    changes one side, both are written and the checkpoint must say the embeddings are untied
    (otherwise the reloaded or GGUF-converted model silently uses the wrong head).
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, bool]] = {}  # id(tensor) -> (output name, written modified?)
        self.untied = False

    def should_write(self, name: str, tensor: torch.Tensor, modified: bool) -> bool:
        """Record ``tensor`` under ``name``; False when it is an unmodified duplicate of a written tensor."""
        key = id(tensor)
        if key in self._seen:
            _, first_modified = self._seen[key]
            if not first_modified and not modified:
                return False
            self.untied = True
        else:
            self._seen[key] = (name, modified)
        return True
