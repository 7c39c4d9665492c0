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
from fastsave.plan import PlannedTensor, SavePlan, SharedProducer

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _reverter() -> Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 converts nothing while loading
        return None
    return revert_weight_conversion


def _layout(tensors: dict[str, torch.Tensor]) -> Layout:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _converted_group(
    members: list[PlannedTensor], revert: Callable, root: nn.Module
) -> Callable[[], dict[str, torch.Tensor]]:
    """Produce the group's tensors of the model, then let transformers turn them into checkpoint ones.

    A group is one tensor of the model that the checkpoint splits (fused MoE experts), several
    that it joins (a fused qkv), or one it renames.
    """
    return lambda: revert(root, {member.name: member.produce() for member in members})


def _groups(plan: SavePlan, outputs: dict[str, Layout]) -> list[list[PlannedTensor]]:
    """Planned tensors joined by the checkpoint tensors their reversals write, in plan order."""
    by_output: dict[str, list[str]] = {}
    for name, layout in outputs.items():
        for out in layout:
            by_output.setdefault(out, []).append(name)
    parent = {t.name: t.name for t in plan.tensors}

    def root_of(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for names in by_output.values():
        for other in names[1:]:
            parent[root_of(other)] = root_of(names[0])
    groups: dict[str, list[PlannedTensor]] = {}
    for planned in plan.tensors:
        groups.setdefault(root_of(planned.name), []).append(planned)
    return list(groups.values())


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

    Most models convert nothing while loading; their plan is returned as it is. For the others each
    tensor's reversal is planned on meta tensors; tensors whose reversals write the same checkpoint
    tensor are produced together. The LoRA bookkeeping (every module merged once) was checked on
    the plan before this step.

    Raises:
        PlanError: transformers' reversal, applied group by group, does not give the layout it
            gives for the whole model. Nothing is written.
    """
    revert = _reverter()
    if revert is None or getattr(root, "_weight_conversions", None) == []:
        return plan
    metas = {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in plan.tensors}
    whole = _layout(revert(root, dict(metas)))
    if whole == _layout(metas):
        return plan
    refusal = PlanError(
        f"transformers converted this {type(root).__name__} checkpoint while loading it in a way fastsave "
        "cannot reverse group by group; save with save_method='lora' and merge with transformers, or "
        "report the model. Nothing was written."
    )
    try:
        outputs = {t.name: _layout(revert(root, {t.name: metas[t.name]})) for t in plan.tensors}
        tensors: list[PlannedTensor] = []
        for members in _groups(plan, outputs):
            first = members[0]
            if len(members) == 1:
                pieces = outputs[first.name]
                if pieces == {first.name: (first.shape, first.dtype)}:
                    tensors.append(first)  # not converted
                    continue
            else:
                pieces = _layout(revert(root, {m.name: metas[m.name] for m in members}))
            group = SharedProducer(_converted_group(members, revert, root))
            for name, (shape, dtype) in pieces.items():
                tensors.append(PlannedTensor(name, shape, dtype, group.part(name)))
    except Exception as error:  # a reversal that needs tensors the group lacks
        raise refusal from error
    if _layout_of(tensors) != whole or len(tensors) != len(whole):
        raise refusal
    # names unique and each exactly what transformers' reversal gives: checked just above
    return replace(plan, tensors=tensors)


def _layout_of(tensors: list[PlannedTensor]) -> Layout:
    return {t.name: (tuple(t.shape), t.dtype) for t in tensors}
