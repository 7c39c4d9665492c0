"""LoRA on a 3-D expert stack (peft's ParamWrapper on fused MoE experts), merged one expert at a time.

peft's delta for the stack is one einsum over every expert (fastsave.adapters.variants.ParamVariant); the
whole-stack float32 copy plus that delta is about 7.5 GB for one Mixtral-8x7B gate_up. Here each
expert's slice of W and its delta (the same einsum on that expert's factors) are computed, added,
rounded and handed on alone, so the working set is one expert. The einsum on one expert must give
the bits of that expert's slice of the whole einsum: verified once per shape in each process on a
few experts of the first stack, and a shape that fails goes back to the whole-stack path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastsave.adapters.delta import LoraDelta
from fastsave.dtypes import same_bits
from fastsave.sources.base import Source
from fastsave.sources.dense import DenseSource

_exact_shapes: dict[tuple, bool] = {}
_SAMPLE_EXPERTS = 4


def _factors(delta: LoraDelta) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = delta.factors_float32("cpu")
    return b.reshape(b.shape[0], -1, delta.num_experts), a.reshape(delta.num_experts, -1, a.shape[-1])


def expert_delta(delta: LoraDelta, b: torch.Tensor, a: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's delta: peft's einsum on that expert's factors, in float32."""
    order = "e o i" if delta.experts_out_in else "e i o"
    return (
        torch.einsum(f"o r e, e r i -> {order}", b[:, :, expert : expert + 1], a[expert : expert + 1])[0]
        * delta.scaling
    )


def _one_expert_is_exact(delta: LoraDelta) -> bool:
    b, a = _factors(delta)
    key = (tuple(b.shape), tuple(a.shape), delta.experts_out_in, torch.get_num_threads())
    if key not in _exact_shapes:
        count = min(delta.num_experts, _SAMPLE_EXPERTS)
        sample = LoraDelta(
            delta.adapter,
            "param",
            a[:count].reshape(-1, a.shape[-1]),
            b[:, :, :count].reshape(b.shape[0], -1),
            delta.scaling,
            num_experts=count,
            experts_out_in=delta.experts_out_in,
        )
        whole = sample.dense_float32("cpu")
        _exact_shapes[key] = all(same_bits(whole[e], expert_delta(delta, b, a, e)) for e in range(count))
    return _exact_shapes[key]


@dataclass
class ExpertMerge:
    """How a stack merges expert by expert."""

    stack: torch.Tensor  # the wrapped parameter, (experts, ., .)
    deltas: Sequence[LoraDelta]


def expert_working_bytes(stack_shape: tuple[int, ...]) -> int:
    """float32 bytes held while one expert of a stack merges: its slice, one delta, the einsum's
    temporary."""
    return 3 * 4 * math.prod(stack_shape[1:])


def expert_merge_plan(source: Source, deltas: Sequence[LoraDelta]) -> ExpertMerge | None:
    """The expert-by-expert merge of a 3-D stack in memory with plain LoRA expert deltas, else None."""
    if not isinstance(source, DenseSource) or source.tensor is None or len(source.shape) != 3:
        return None
    if not deltas or any(not d.variant.by_experts or d.num_experts != source.shape[0] for d in deltas):
        return None
    if not all(_one_expert_is_exact(d) for d in deltas):
        return None
    return ExpertMerge(source.tensor.detach(), deltas)


def stream_experts(merge: ExpertMerge, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The merged stack, rounded once to ``dtype``, one expert after another."""
    factors = [_factors(d) for d in merge.deltas]
    for expert in range(merge.stack.shape[0]):
        # one expert into the CPU (a stack on a GPU too large for the VRAM budget merges here)
        weight = merge.stack[expert].to(device="cpu", dtype=torch.float32, copy=True)
        for delta, (b, a) in zip(merge.deltas, factors, strict=True):
            weight.add_(expert_delta(delta, b, a, expert))
        yield weight.to(dtype)
