"""A source whose stored layout is the transpose of the compute layout (a Conv1D weight on disk).

transformers quantizes a GPT-2-style Conv1D weight, stored (in, out), into a bitsandbytes layer
that computes (out, in). Reading that weight from a 16-bit checkpoint for such a layer (the
original base) gives the stored layout; this turns it into the compute layout the adapter's delta
is defined in. The plan's layout step transposes the result back for the checkpoint.
"""

from __future__ import annotations

import torch

from fastsave.sources.base import Source


class TransposedSource(Source):
    """The transpose of a 2-D source."""

    def __init__(self, inner: Source) -> None:
        super().__init__(inner.shape[::-1], inner.stored_dtype, inner.device)
        self.inner = inner
        self.kind = inner.kind
        self.quant_settings = inner.quant_settings
        self.computed = inner.computed

    def float32(self) -> torch.Tensor:
        """The inner values transposed, contiguous."""
        return self.inner.float32().T.contiguous()

    def as_stored(self) -> torch.Tensor:
        """The inner stored values transposed."""
        return self.inner.as_stored().T

    def describe(self) -> str:
        """The inner source's words."""
        return self.inner.describe()
