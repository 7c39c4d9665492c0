"""Write the checkpoint's own tensor names and layout, not the model's in-memory ones.

transformers 5 converts some checkpoints while loading them: it renames tensors (Mixtral's
``block_sparse_moe`` becomes ``mlp``) and fuses per-expert weights into one 3D tensor a layer
(``experts.{e}.w1.weight`` and ``w3`` become ``experts.gate_up_proj``). Its ``save_pretrained``
reverses that on the way out, and vLLM and llama.cpp's converter read only the checkpoint layout.
fastsave plans tensors under their in-memory names; this module maps the plan to the checkpoint
layout with transformers' own reversal (``revert_weight_conversion``): planned on shape-only meta
tensors, then applied to one source tensor at a time as the merge streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from fastsave.errors import PlanError
from fastsave.plan import PlannedTensor, SavePlan

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _reverter() -> Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 converts nothing while loading
        return None
    return revert_weight_conversion


def _layout(tensors: dict[str, torch.Tensor]) -> Layout:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


class _SplitSource:
    """One planned tensor that the checkpoint stores as several: produced once, handed out in pieces.

    The producer asks for the pieces in plan order, one after the other, so at most one source
    tensor (and views of it) is held at a time.
    """

    def __init__(self, planned: PlannedTensor, revert: Callable, root: nn.Module) -> None:
        self._planned = planned
        self._revert = revert
        self._root = root
        self._pieces: dict[str, torch.Tensor] | None = None

    def piece(self, name: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if self._pieces is None:
                self._pieces = dict(self._revert(self._root, {self._planned.name: self._planned.produce()}))
            tensor = self._pieces.pop(name)
            if not self._pieces:
                self._pieces = None
            return tensor

        return produce


def stored_as(root: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors (name -> shape) that hold the model's tensor ``name``.

    ``{name: shape}`` when transformers converts nothing for it; several entries for a fused MoE
    expert tensor; one entry under another name for a renamed one.
    """
    revert = _reverter()
    if revert is None:
        return {name: tuple(tensor.shape)}
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return {key: tuple(value.shape) for key, value in revert(root, {name: meta}).items()}


def to_checkpoint_names(root: nn.Module, plan: SavePlan) -> SavePlan:
    """The plan under the names and shapes transformers' ``save_pretrained`` would write.

    Most models convert nothing while loading; their plan is returned as it is.

    Raises:
        PlanError: the model's load-time conversion joins several in-memory tensors into one
            checkpoint tensor, which cannot be streamed one tensor at a time. Nothing is written.
    """
    revert = _reverter()
    if revert is None or getattr(root, "_weight_conversions", None) == []:
        return plan
    metas = {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in plan.tensors}
    whole = _layout(revert(root, dict(metas)))
    if whole == _layout(metas):
        return plan
    tensors: list[PlannedTensor] = []
    for planned in plan.tensors:
        pieces = _layout(revert(root, {planned.name: metas[planned.name]}))
        if pieces == {planned.name: (planned.shape, planned.dtype)}:
            tensors.append(planned)
            continue
        if len(pieces) == 1:  # renamed only
            ((name, _),) = pieces.items()
            tensors.append(replace(planned, name=name))
            continue
        source = _SplitSource(planned, revert, root)
        for index, (name, (shape, dtype)) in enumerate(pieces.items()):
            lora_module = planned.lora_module if index == 0 else None
            tensors.append(PlannedTensor(name, shape, dtype, source.piece(name), lora_module))
    if _layout_of(tensors) != whole or len(tensors) != len(whole):
        raise PlanError(
            f"transformers converted this {type(root).__name__} checkpoint while loading it in a way that "
            "joins several tensors of the model into one checkpoint tensor; fastsave cannot write that "
            "layout one tensor at a time yet. Save with save_method='lora' and merge with transformers, "
            "or report the model. Nothing was written."
        )
    # names unique and each exactly what transformers' reversal gives: checked just above
    return replace(plan, tensors=tensors)


def _layout_of(tensors: list[PlannedTensor]) -> Layout:
    return {t.name: (tuple(t.shape), t.dtype) for t in tensors}
