"""Write the checkpoint's own tensor names and layout, not the model's in-memory ones.

transformers 5 converts some checkpoints while loading them: it renames tensors (Mixtral's
``block_sparse_moe`` becomes ``mlp``) and fuses per-expert weights into one 3D tensor a layer
(``experts.{e}.w1.weight`` and ``w3`` become ``experts.gate_up_proj``); HrmText's checkpoint fuses
projections that it splits. Its ``save_pretrained`` reverses that on the way out, and vLLM and
llama.cpp's converter read only the checkpoint layout. The plan is built under the in-memory names;
this step maps it to the checkpoint layout with transformers' own reversal
(``revert_weight_conversion``): planned on shape-only meta tensors, then applied to one group of
produced tensors at a time as the merge streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from fastsave.errors import PlanError
from fastsave.merge.assemble import assemble
from fastsave.plan.items import Plan, PlanItem, SharedProducer

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _reverter() -> Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 converts nothing while loading
        return None
    return revert_weight_conversion


class _LayoutConversions:
    """The model as transformers' reversal sees it, with only the conversions of the weights' layout.

    A model loaded from a pre-quantized checkpoint (bitsandbytes 4-bit saved with save_pretrained)
    also records the quantizer's deserialization (packed bytes plus quant-state companions -> one
    Params4bit), which has no reverse. fastsave writes dequantized (or its own re-quantized)
    tensors, so that step does not apply to what it writes; the layout conversions still do.
    """

    def __init__(self, root: nn.Module, conversions: list) -> None:
        self._root = root
        self._weight_conversions = conversions

    def __getattr__(self, name: str):
        return getattr(self._root, name)


def _default_conversions(root: nn.Module) -> list | None:
    """The conversions transformers' reversal applies to a model not loaded with from_pretrained.

    It would look them up (a walk over every module) on each call; the plan calls it once per
    item, so they are looked up once here, the way it does: the model type's default mapping
    without legacy renames or prefix changes. None: the lookup is not available (then the model
    itself is handed over and transformers looks them up each time).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return None
    conversions = get_model_conversion_mapping(root, add_legacy=False)
    return [c for c in conversions if not isinstance(c, PrefixChange)]


def _loading_operations(quantizer: object | None) -> tuple[type, ...]:
    """The operation classes with which ``quantizer`` turns serialized tensors into its parameters.

    Newer transformers list them (``get_load_operations``: deserialize, and dequantize where the
    quantizer has one); older ones (5.17, which Unsloth pins) only put them into the conversions
    the quantizer adds (``get_weight_conversions``), so they are read off those.
    """
    if quantizer is None:
        return ()
    listed = getattr(quantizer, "get_load_operations", None)
    if callable(listed):
        return tuple(listed().values())
    added = getattr(quantizer, "get_weight_conversions", None)
    conversions = added() if callable(added) else []
    return tuple({type(op) for c in conversions for op in getattr(c, "operations", ())})


def _conversion_owner(root: nn.Module) -> nn.Module | _LayoutConversions | None:
    """What to hand transformers' reversal: ``root`` or a view of it with only its layout
    conversions, found once; None when there is nothing to reverse."""
    conversions = getattr(root, "_weight_conversions", None)
    if conversions is None:  # not loaded with from_pretrained: transformers uses its default mapping
        conversions = _default_conversions(root)
        if conversions is None:
            return root
    loading = _loading_operations(getattr(root, "hf_quantizer", None))
    kept = [c for c in conversions if not any(isinstance(op, loading) for op in getattr(c, "operations", ()))]
    return _LayoutConversions(root, kept) if kept else None


def _layout(tensors: dict[str, torch.Tensor]) -> Layout:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _groups(items: list[PlanItem], outputs: dict[str, Layout]) -> list[list[PlanItem]]:
    """Items joined by the checkpoint tensors their reversals write, in plan order (union-find)."""
    by_output: dict[str, list[str]] = {}
    for name, layout in outputs.items():
        for out in layout:
            by_output.setdefault(out, []).append(name)
    parent = {item.name: item.name for item in items}

    def root_of(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for names in by_output.values():
        for other in names[1:]:
            parent[root_of(other)] = root_of(names[0])
    groups: dict[str, list[PlanItem]] = {}
    for item in items:
        groups.setdefault(root_of(item.name), []).append(item)
    return list(groups.values())


def stored_as(
    root: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors (name -> shape) that hold the model's tensor ``name``.

    ``{name: shape}`` when transformers converts nothing for it; several entries for a fused MoE
    expert tensor; one entry under another name for a renamed one.
    """
    revert = _reverter()
    owner = _conversion_owner(root)
    if revert is None or owner is None:
        return {name: tuple(shape)}
    meta = torch.empty(shape, dtype=dtype, device="meta")
    return {key: tuple(value.shape) for key, value in revert(owner, {name: meta}).items()}


def to_checkpoint_layout(root: nn.Module, plan: Plan) -> Plan:
    """The plan under the names and shapes transformers' ``save_pretrained`` would write.

    Most models convert nothing while loading; their plan is returned as it is. For the others each
    item's reversal is planned on meta tensors; items whose reversals write the same checkpoint
    tensor are produced together. Items already named as the checkpoint names them pass through.

    Raises:
        PlanError: transformers' reversal, applied group by group, does not give the layout it
            gives for the whole model. Nothing is written.
    """
    revert = _reverter()
    owner = _conversion_owner(root)
    if revert is None or owner is None:
        return plan
    convertible = [i for i in plan.items if not i.checkpoint_named]
    metas = {i.name: torch.empty(i.shape, dtype=i.dtype, device="meta") for i in convertible}
    whole = _layout(revert(owner, dict(metas)))
    if whole == _layout(metas):
        return plan
    refusal = PlanError(
        f"transformers converted this {type(root).__name__} checkpoint while loading it in a way fastsave "
        "cannot reverse group by group; save with save_method='lora' and merge with transformers, or "
        "report the model. Nothing was written."
    )
    try:
        outputs = {i.name: _layout(revert(owner, {i.name: metas[i.name]})) for i in convertible}
        by_first: dict[str, list[PlanItem]] = {}
        for members in _groups(convertible, outputs):
            by_first[members[0].name] = _convert_group(members, outputs, metas, revert, owner)
    except Exception as error:  # a reversal that needs tensors the group lacks
        raise refusal from error
    converted = [item for group in by_first.values() for item in group]
    if {i.name: (tuple(i.shape), i.dtype) for i in converted} != whole or len(converted) != len(whole):
        raise refusal
    # plan order: a group's items where its first member stood, checkpoint-named items in place
    items: list[PlanItem] = []
    for item in plan.items:
        if item.checkpoint_named:
            items.append(item)
        elif item.name in by_first:
            items.extend(by_first[item.name])
    return replace(plan, items=items)


def _convert_group(
    members: list[PlanItem],
    outputs: dict[str, Layout],
    metas: dict[str, torch.Tensor],
    revert: Callable,
    root: nn.Module | _LayoutConversions,
) -> list[PlanItem]:
    """The checkpoint items of one group of plan items."""
    first = members[0]
    if len(members) == 1:
        pieces = outputs[first.name]
        if pieces == {first.name: (first.shape, first.dtype)}:
            return [first]  # not converted
    else:
        pieces = _layout(revert(root, {m.name: metas[m.name] for m in members}))
    made = _GroupMembers(members, revert, root)
    group = SharedProducer(made.make, made.participate if made.collective else None)
    return [
        group.item(name, shape, dtype, source_kind=first.source_kind)
        for name, (shape, dtype) in pieces.items()
    ]


class _GroupMembers:
    """The members of one group: produced whole, then transformers' reversal of them all.

    ``participate`` enters the collectives of the members not produced yet (a rank that writes none
    of the group's parts, or whose making of it failed part way), so every rank enters each
    member's gathers exactly once.
    """

    def __init__(
        self, members: list[PlanItem], revert: Callable, root: nn.Module | _LayoutConversions
    ) -> None:
        self.members = members
        self.revert = revert
        self.root = root
        self.next = 0  # the first member whose production has not begun
        self.collective = any(m.participate is not None for m in members)

    def make(self) -> dict[str, torch.Tensor]:
        # each member whole (spilled to disk when the budget cannot hold it), then transformers' reversal
        tensors = {}
        for index, member in enumerate(self.members):
            self.next = index  # if it stops part way, participate() resumes here (a module is gathered once)
            tensors[member.name] = assemble(member)
        self.next = len(self.members)
        return self.revert(self.root, tensors)

    def participate(self) -> None:
        for member in self.members[self.next :]:
            if member.participate is not None:
                member.participate()
        self.next = len(self.members)
