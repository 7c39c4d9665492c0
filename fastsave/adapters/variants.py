"""Delta variants, one class each: how a delta is computed, whether it can be merged by rows, and
how it is folded into the weight and its bias (peft's own definitions, in float32).

A :class:`~fastsave.adapters.delta.LoraDelta` gets its variant when it is built (from the layer's
kind and whether it carries a DoRA magnitude); the other peft tuners bring their own variant
(fastsave.adapters.tuners). The merge strategies ask the variant, never a kind name:

* :meth:`Variant.dense`: the operand of the whole-matrix fold (for LoRA the whole delta);
* :meth:`Variant.rows`: a function giving the operand for rows i..j of the weight, or None when
  the maths does not give the whole-matrix bits a block at a time (blocks of a low-rank product
  come from the :class:`BlockwiseCheck` the row merge passes: computed alone where the BLAS gives
  the whole product's bits, else read from the whole product computed once);
* :meth:`Variant.fold`: the operand folded into the running float32 weight (added, multiplied,
  rotated, rows replaced);
* :meth:`Variant.fold_bias`: the same for the layer's bias, where the tuner changes it.

A new LoRA variant is one class here and its entry in :func:`variant_of`; a new tuner is one
module in fastsave.adapters with its variant and its reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

DeltaRows = Callable[[int, int], Any]  # rows i..j of the weight -> the operand its fold takes


ProductBlocks = Callable[[int, int], torch.Tensor]  # rows (or columns) i..j of b @ a -> a fresh tensor


class BlockwiseCheck(Protocol):
    """What the row merge tells a variant about the BLAS (fastsave.merge.row_blocks checks it)."""

    def product(self, b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> bool:
        """Whether blocks of ``step`` rows (or columns) of ``b @ a`` computed alone give the full
        product's bits."""

    def blocks(self, b: torch.Tensor, a: torch.Tensor, step: int, columns: bool = False) -> ProductBlocks:
        """Rows i..j of ``b @ a`` (with ``columns``: columns i..j, as ``b @ a[:, i:j]`` lays them
        out) with the whole product's bits, a fresh tensor per call the caller may scale in place."""


class LoraDelta(Protocol):
    """What a variant reads of a delta (fastsave.adapters.delta.LoraDelta holds these)."""

    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None
    num_experts: int
    experts_out_in: bool

    def factors_float32(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as float32 on ``device``."""


class Variant:
    """Plain LoRA on a linear layer: ``transpose(B @ A, fan_in_fan_out) * scaling``, added to W."""

    name = "linear"
    needs_base = False  # the fold reads W before any adapter of this merge (DoRA's norm)
    by_experts = False  # merged one expert at a time (a 3-D expert stack)

    def dense(self, delta: LoraDelta, device: torch.device | str) -> torch.Tensor:
        """The whole delta in float32, in the layout of the weight it is added to."""
        b, a = delta.factors_float32(device)
        product = b @ a
        return (product.T if delta.fan_in_fan_out else product) * delta.scaling

    def by_rows(self, delta: LoraDelta) -> bool:
        """Whether rows of the merged weight can be computed a block at a time."""
        return True

    def rows_are_columns(self, delta: LoraDelta) -> bool:
        """The weight's rows are columns of B @ A (the delta is the transposed product)."""
        return delta.fan_in_fan_out

    def rows(self, delta: LoraDelta, step: int, check: BlockwiseCheck) -> DeltaRows | None:
        """Rows i..j of the delta (float32, scaled) with the whole delta's bits (the product's
        blocks from ``check``); None when the variant does not merge by rows."""
        if not self.by_rows(delta):
            return None
        b, a = delta.factors_float32("cpu")
        scaling = delta.scaling
        # peft's delta is (B @ A).T when rows are columns: rows of the delta are columns of the product
        columns = self.rows_are_columns(delta)
        product = check.blocks(b, a, step, columns)
        # scaled in place: the same float32 multiply as peft's `* scaling`, without a second block
        if columns:
            return lambda i, j: product(i, j).mul_(scaling).T
        return lambda i, j: product(i, j).mul_(scaling)

    def fold(
        self,
        delta: LoraDelta,
        base: torch.Tensor | None,
        current: torch.Tensor,
        dense: torch.Tensor,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``current`` with ``dense`` folded in (rows ``rows`` of the weight when given)."""
        return current.add_(dense)

    def changes_bias(self, delta: Any) -> bool:
        """Whether merging this delta changes the layer's bias (LoRA: a lora_bias adapter)."""
        return getattr(delta, "bias", None) is not None

    def fold_bias(self, delta: Any, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` (float32, owned) with this delta's part folded in: lora_B.bias * scaling."""
        if delta.bias is not None:
            bias += delta.bias.detach().to(device=bias.device, dtype=torch.float32) * delta.scaling
        return bias


class EmbeddingVariant(Variant):
    """LoRA on an embedding: ``(B @ A).T * scaling`` with A = lora_embedding_A, B = lora_embedding_B."""

    name = "embedding"

    def dense(self, delta: LoraDelta, device: torch.device | str) -> torch.Tensor:
        b, a = delta.factors_float32(device)
        return (b @ a).T * delta.scaling

    def rows_are_columns(self, delta: LoraDelta) -> bool:
        return True


class ParamVariant(Variant):
    """LoRA on a bare parameter (peft's ParamWrapper): B @ A for a 2-D parameter (a router); for a
    3-D expert stack one rank-r pair an expert, A (experts * r, in) and B (out, r * experts) paired
    as peft's einsum pairs them, in the (experts, in, out) or (experts, out, in) order peft chose."""

    name = "param"
    by_experts = True

    def dense(self, delta: LoraDelta, device: torch.device | str) -> torch.Tensor:
        b, a = delta.factors_float32(device)
        if delta.num_experts == 1:
            product = b @ a
            return (product.T if delta.fan_in_fan_out else product) * delta.scaling
        a = a.reshape(delta.num_experts, -1, a.shape[-1])
        b = b.reshape(b.shape[0], -1, delta.num_experts)
        order = "e o i" if delta.experts_out_in else "e i o"
        return torch.einsum(f"o r e, e r i -> {order}", b, a) * delta.scaling

    def by_rows(self, delta: LoraDelta) -> bool:
        return False


class DoraVariant(Variant):
    """DoRA on a linear layer: ``magnitude / ||W_base + delta||`` per output row (the norm over
    in_features; transposed with fan_in_fan_out) times ``W + delta``, W the running sum."""

    name = "dora linear"
    needs_base = True

    def by_rows(self, delta: LoraDelta) -> bool:
        return not delta.fan_in_fan_out  # the norm then runs down columns

    def fold(self, delta, base, current, dense, rows=None):
        magnitude = delta.magnitude.detach()
        if rows is not None:
            magnitude = magnitude[rows[0] : rows[1]]
        magnitude = magnitude.to(device=current.device, dtype=torch.float32)
        base_t = base.T if delta.fan_in_fan_out else base
        dense_t = dense.T if delta.fan_in_fan_out else dense
        norm = torch.linalg.norm(base_t + 1 * dense_t, dim=1)
        factor = (magnitude / norm).view(-1, 1)
        if delta.fan_in_fan_out:
            factor = factor.T
        return factor * (current + dense)


class DoraEmbeddingVariant(EmbeddingVariant):
    """DoRA on an embedding: the norm is per embedding column, so only the whole matrix merges it."""

    name = "dora embedding"
    needs_base = True

    def by_rows(self, delta: LoraDelta) -> bool:
        return False

    def fold(self, delta, base, current, dense, rows=None):
        magnitude = delta.magnitude.detach().to(device=base.device, dtype=torch.float32)
        norm = (base + dense).T.norm(p=2, dim=1, keepdim=True).T
        return (magnitude / norm) * (current + dense)


_VARIANTS: dict[tuple[str, bool], Variant] = {
    ("linear", False): Variant(),
    ("embedding", False): EmbeddingVariant(),
    ("param", False): ParamVariant(),
    ("linear", True): DoraVariant(),
    ("embedding", True): DoraEmbeddingVariant(),
}


def variant_of(kind: str, dora: bool) -> Variant:
    """The variant of a delta on a layer of ``kind`` ("linear", "embedding", "param"), DoRA or not.

    Raises:
        ValueError: a combination peft does not define (DoRA on a bare parameter).
    """
    try:
        return _VARIANTS[(kind, dora)]
    except KeyError:
        raise ValueError(f"no LoRA variant for a {kind} layer{' with DoRA' if dora else ''}") from None
