"""The one plan walk: any model (live, or built on the meta device around a saved adapter) to a plan.

The walk visits the model's modules once, in order, and turns each tensor the checkpoint holds
into a plan item: a *source* of its values (fastsave.sources) x the *deltas* on it
(fastsave.adapters) -> an output tensor, produced by the merge dispatcher (fastsave.merge). What
differs between a save from a trained model in memory, one into the original 16-bit base, and
the command line's merge of a saved adapter into a base on disk is only how a tensor's source is
resolved: the save's *input* (fastsave.inputs) answers that through :class:`Resolver`.

Module kinds, each decided once, by what the module is:

* a peft LoRA layer, or a layer of another tuner fastsave merges (IA3, LoHa, LoKr, VeRA, ...;
  fastsave.adapters.tuners): its base layer's tensors, the weight merged with the selected
  adapters' deltas, the bias with those that change it (lora_bias, IA3); names without
  ``base_layer``;
* peft's trainable-tokens wrapper (``trainable_token_indices`` beside LoRA): the same, for the
  tuner layer it holds (``token_adapter``) around the embedding;
* peft's ParamWrapper (LoRA on bare parameters, possibly nested): the wrapped module's tensors,
  the wrapped parameters merged;
* peft's ModulesToSaveWrapper: the trained copy replaces the original;
* any other module: its own parameters and persistent buffers, as held (a quantized weight
  dequantized).

Each of these is a *walk unit* (:func:`walk_units`): the module whose tensors it plans, with or
without its subtree. Every item remembers the unit that planned it (``PlanItem.planned_by``), so an
input that can read a module's tensors only for a moment (a sharded model, fastsave.inputs.sharded_model)
plans once on placeholders of the right shape (``shapes_only``) and later plans each unit again
(:func:`plan_unit`) while its tensors are at hand. Names are the unwrapped model's: the segments that
FSDP, activation checkpointing and torch.compile insert are removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from fastsave.adapters.delta import LoraDelta, TunerDelta, change_key
from fastsave.adapters.live_peft import (
    base_layer_of,
    deltas_of,
    is_adapter_layer,
    is_lora_factor_container,
    is_param_wrapper,
    is_tokens_wrapper,
    refuse_other_tuner,
    select_adapters,
)
from fastsave.collector import collection_paused
from fastsave.errors import PlanError
from fastsave.merge.dispatch import bias_producer, copy_producer, weight_producer
from fastsave.module_tree import named_modules
from fastsave.plan.items import Plan, PlanItem
from fastsave.plan.ties import TiedWeights
from fastsave.sources import ModuleTensor, module_tensors
from fastsave.sources.safetensors_file import StoredPiecesSource
from fastsave.sources.sharded import clean_name

try:
    from peft.utils.other import ModulesToSaveWrapper
except ImportError:  # pragma: no cover - peft is a dependency
    ModulesToSaveWrapper = ()
try:
    from peft import PeftMixedModel
except ImportError:  # pragma: no cover - peft before mixed models
    PeftMixedModel = None


class Resolver(Protocol):
    """How a save's input turns a module's tensor into its source (fastsave.inputs)."""

    def resolve(self, name: str, module: nn.Module, entry: ModuleTensor, merged: bool) -> ModuleTensor | None:
        """``entry`` with its source set (or replaced); None: the checkpoint does not hold this tensor.

        Args:
            name: the tensor's name in the model (no peft prefixes, no ``base_layer``).
            module: the module that holds it (a LoRA layer's base layer).
            entry: what fastsave.sources found; ``entry.source`` is None for a meta tensor.
            merged: whether deltas will be added to it.

        Raises:
            PlanError: the tensor's values cannot be found.
        """
        ...


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel or PeftMixedModel (or the model itself), under any
    torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    if PeftMixedModel is not None and isinstance(model, PeftMixedModel):  # it has no get_base_model
        return model.base_model.model
    return model


def _saved_copy(wrapper: nn.Module, adapter_names: Sequence[str] | None) -> nn.Module:
    """The module a ModulesToSaveWrapper saves: the selected (or active) adapter's trained copy."""
    copies = wrapper.modules_to_save
    wanted = [a for a in (adapter_names or []) if a in copies]
    if not wanted:
        active = wrapper.active_adapter
        wanted = [a for a in (active if isinstance(active, list) else [active]) if a in copies]
    if not wanted or getattr(wrapper, "disable_adapters", False):
        return wrapper.original_module
    return copies[wanted[0]]


def _planned_only() -> torch.Tensor:
    raise RuntimeError(
        "this plan item was planned from shapes only (shapes_only=True); its input produces it"
    )


class _Walk:
    """The state of one walk: the items so far, tied weights, the resolver and the output dtype.

    ``shapes_only``: the model holds placeholders (meta tensors of the right shapes and dtypes), so
    items get their names, shapes, dtypes and census entries, every adapter is checked, but nothing
    is set up to produce values (the input plans each unit again when its tensors are at hand).
    """

    def __init__(
        self,
        resolver: Resolver,
        dtype: torch.dtype,
        adapter_names: Sequence[str] | None,
        shapes_only: bool = False,
    ) -> None:
        self.resolver = resolver
        self.dtype = dtype
        self.adapter_names = adapter_names
        self.shapes_only = shapes_only
        self.items: list[PlanItem] = []
        self.ties = TiedWeights()
        self.unit: str | None = None  # the walk unit being planned (PlanItem.planned_by)
        self.also_merged: list[str] = []  # see Plan.also_merged

    def add(
        self,
        name: str,
        module: nn.Module,
        entry: ModuleTensor,
        role: str = "copy",
        deltas: Sequence[LoraDelta | TunerDelta] = (),
        merged_before: Sequence[LoraDelta | TunerDelta] = (),
        modified: bool | tuple = False,
        lora_module: str | None = None,
    ) -> None:
        """Plan one tensor; ``role``: "weight" (merged), "bias" (merged lora_bias) or "copy";
        ``modified``: the change the adapters bring (fastsave.plan.ties)."""
        name = clean_name(name)
        entry = self.resolver.resolve(name, module, entry, merged=bool(deltas) or bool(merged_before))
        if entry is None:
            return
        if entry.without_merged_adapters:  # the source has none of the adapters the model merged
            deltas = (*merged_before, *deltas)
        if not self.ties.should_write(name, entry.tensor, modified):
            if lora_module is not None:  # merged alike under the tied name written first
                self.also_merged.append(clean_name(lora_module))
            return
        source = entry.source
        if isinstance(source, StoredPiecesSource):
            if self.shapes_only:
                raise PlanError(f"{name}: a tensor stored in pieces cannot be planned from shapes only")
            if deltas:
                source.float32()  # raises, naming the pieces
            for piece, piece_source in source.pieces.items():
                production = copy_producer(piece_source, self.dtype, piece)
                out_dtype = self.dtype if piece_source.floating else piece_source.stored_dtype
                self.items.append(
                    PlanItem(
                        piece,
                        piece_source.shape,
                        out_dtype,
                        production.produce,
                        source_kind=source.kind,
                        checkpoint_named=True,
                        stream=production.stream,
                        working_bytes=production.working_bytes,
                    )
                )
            return
        shape = source.shape[::-1] if entry.transposed else source.shape
        out_dtype = self.dtype if source.floating else source.stored_dtype
        if self.shapes_only:
            production = None
        elif role == "weight":
            production = weight_producer(source, deltas, self.dtype, name, entry.transposed)
        elif role == "bias":
            production = bias_producer(source, deltas, self.dtype, name)
        else:
            production = copy_producer(source, self.dtype, name, entry.transposed)
        self.items.append(
            PlanItem(
                name,
                tuple(shape),
                out_dtype,
                production.produce if production else _planned_only,
                lora_module=clean_name(lora_module) if lora_module is not None else None,
                source_kind=source.describe(),
                requantize=source.quant_settings if entry.attr == "weight" else None,
                requantize_transposed=entry.transposed or source.quantized_as_transpose,
                stream=production.stream if production else None,
                working_bytes=production.working_bytes if production else 0,
                planned_by=self.unit,
                linear_weight=entry.attr == "weight" and not entry.transposed and _is_linear(module),
            )
        )

    def add_module(self, prefix: str, module: nn.Module, modified: bool = False) -> None:
        """A module's own tensors, as held."""
        for entry in module_tensors(module, meta_ok=self.shapes_only):
            self.add(prefix + entry.attr, module, entry, modified=modified)

    def add_adapter_layer(self, name: str, layer: nn.Module, census_name: str | None = None) -> None:
        """A LoRA (or other merged tuner's) layer: its base layer's weight merged, its bias merged with
        the adapters that change it. ``census_name``: the layer's own name, where it is not ``name``
        (the tuner layer inside peft's trainable-tokens wrapper).

        Layers of several tuners nested around one base layer (peft's mixed models) are merged in
        peft's order: the inner layers from the outside in, then the outermost.
        """
        prefix = f"{name}." if name else ""
        own_name = census_name or name
        chain = [(own_name, layer)]
        while is_adapter_layer(inner := chain[-1][1]._modules.get("base_layer")):
            chain.append((f"{chain[-1][0]}.base_layer", inner))
        base = base_layer_of(layer)
        bias = base._parameters.get("bias") if "bias" in base._parameters else getattr(base, "bias", None)
        has_bias = isinstance(bias, torch.Tensor)
        meta_ok = self.shapes_only
        deltas: list = []
        merged_before: list = []
        merged_names = []
        for layer_name, adapter_layer in chain[1:] + chain[:1]:
            to_add, merged = select_adapters(adapter_layer, self.adapter_names)
            if to_add:
                deltas += deltas_of(adapter_layer, to_add, merged, name, has_bias, meta_ok)
            if merged:
                merged_before += deltas_of(adapter_layer, merged, (), name, has_bias, meta_ok)
            if to_add or merged:
                merged_names.append(layer_name)
        # the census counts every layer that holds an adapter: one names the item, the rest ride on it
        lora_module = own_name if own_name in merged_names else (merged_names[0] if merged_names else None)
        self.also_merged += [n for n in merged_names if n != lora_module]
        for entry in module_tensors(base, meta_ok=meta_ok):
            full = prefix + entry.attr
            if entry.attr == "weight":
                change = change_key(tuple(deltas)) if deltas else False
                self.add(full, base, entry, "weight", deltas, merged_before, change, lora_module)
            elif entry.attr == "bias":
                changed = any(d.variant.changes_bias(d) for d in deltas)
                self.add(full, base, entry, "bias", deltas, merged_before, changed)
            else:
                self.add(full, base, entry)

    def add_param_wrappers(self, name: str, wrapper: nn.Module) -> None:
        """Nested ParamWrappers (one a wrapped parameter): the innermost module's tensors, wrapped ones merged."""
        prefix = f"{name}." if name else ""
        wrapped: dict[str, tuple[str, nn.Module]] = {}
        layer_name, inner = name, wrapper
        while is_param_wrapper(inner):
            wrapped[inner.parameter_name] = (layer_name, inner)
            layer_name, inner = f"{layer_name}.base_layer", inner.base_layer
        for sub_name, sub in inner.named_modules():
            sub_prefix = prefix + (f"{sub_name}." if sub_name else "")
            for entry in module_tensors(sub, meta_ok=self.shapes_only):
                target = wrapped.get(entry.attr) if not sub_name else None
                if target is None:
                    self.add(sub_prefix + entry.attr, sub, entry)
                    continue
                layer_name, layer = target
                to_add, merged = select_adapters(layer, self.adapter_names)
                if not to_add and not merged:
                    self.add(sub_prefix + entry.attr, sub, entry)
                    continue
                if not entry.tensor.is_floating_point() and entry.tensor.device.type != "meta":
                    raise PlanError(
                        f"LoRA on {layer_name} wraps a {entry.tensor.dtype} parameter (quantized?), which "
                        "fastsave cannot merge; save it with save_method='lora'"
                    )
                meta_ok = self.shapes_only
                deltas = deltas_of(layer, to_add, merged, layer_name, False, meta_ok) if to_add else ()
                merged_before = deltas_of(layer, merged, (), layer_name, False, meta_ok) if merged else ()
                self.add(
                    sub_prefix + entry.attr,
                    sub,
                    entry,
                    "weight",
                    deltas,
                    merged_before,
                    bool(to_add),
                    layer_name,
                )


def _is_linear(module: nn.Module) -> bool:
    """A linear layer as transformers builds it (bitsandbytes' and torchao's are nn.Linear; HQQ's is not)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "HQQLinear"


def _is_modules_to_save(module: nn.Module) -> bool:
    return bool(ModulesToSaveWrapper) and isinstance(module, ModulesToSaveWrapper)


def _planned_whole(module: nn.Module) -> bool:
    return is_adapter_layer(module) or is_tokens_wrapper(module) or _is_modules_to_save(module)


def walk_units(root: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """The modules the walk plans, each once, in module order: ``(name, module, whole)``.

    ``whole``: the unit is planned with its subtree (a LoRA layer, nested ParamWrappers, a
    ModulesToSaveWrapper); otherwise only the module's own tensors. Names are cleaned of wrapper
    segments (fastsave.sources.sharded.clean_name). Modules inside a whole unit are skipped by
    identity, in linear time.
    """
    for name, module in named_modules(root, stop_below=_planned_whole):
        yield clean_name(name), module, _planned_whole(module)


def _plan_unit(
    walk: _Walk, name: str, module: nn.Module, shared: set[int], adapter_names: Sequence[str] | None
) -> None:
    """Plan one walk unit's tensors into ``walk``; its kind decided once, by what the module is."""
    walk.unit = name
    prefix = f"{name}." if name else ""
    if is_param_wrapper(module):
        walk.add_param_wrappers(name, module)
    elif is_adapter_layer(module):
        walk.add_adapter_layer(name, module)
    elif is_tokens_wrapper(module):
        walk.add_adapter_layer(name, module.token_adapter, f"{prefix}token_adapter")
    elif _is_modules_to_save(module):
        saved = _saved_copy(module, adapter_names)
        modified = saved is not module.original_module
        if modified and any(id(p) in shared for p in module.original_module.parameters()):
            walk.ties.untied = True  # the trained copy replaces one side of a tied pair
        for sub_name, sub in saved.named_modules():
            walk.add_module(prefix + (f"{sub_name}." if sub_name else ""), sub, modified)
    else:
        walk.add_module(prefix, module)


def walk_model(
    root: nn.Module,
    resolver: Resolver,
    dtype: torch.dtype,
    adapter_names: Sequence[str] | None,
    census: list[str],
    shapes_only: bool = False,
    tied: set[int] | None = None,
) -> Plan:
    """Walk ``root`` once and plan every tensor of its merged checkpoint, under the model's names.

    ``census``: the LoRA modules found independently of this walk (fastsave.plan.checks compares).
    ``shapes_only``: the model holds placeholders; items are planned (names, shapes, dtypes, every
    adapter checked) but cannot be produced: the input plans each unit again with :func:`plan_unit`.
    ``tied``: the ids of parameters held under several names, when the caller's census pass
    collected them (fastsave.adapters.live_peft.lora_module_census); else a pass here finds them.

    Raises:
        PlanError / UnsupportedAdapterError: an adapter that cannot be merged exactly, a tensor whose
            values cannot be found. Nothing is written then.
    """
    with collection_paused():
        shared = _survey(root) if tied is None else tied
        walk = _Walk(resolver, dtype, adapter_names, shapes_only)
        for name, module, _ in walk_units(root):
            _plan_unit(walk, name, module, shared, adapter_names)
    return Plan(walk.items, dtype, census, walk.ties.untied, also_merged=walk.also_merged)


def plan_unit(
    name: str,
    module: nn.Module,
    resolver: Resolver,
    dtype: torch.dtype,
    adapter_names: Sequence[str] | None,
) -> list[PlanItem]:
    """The items of one walk unit alone (``name`` and ``module`` as :func:`walk_units` gives them).

    The same planning as :func:`walk_model` gives that unit, except that tied weights are seen only
    within the unit: an input that plans a unit again to produce it looks its items up by name.
    """
    walk = _Walk(resolver, dtype, adapter_names)
    _plan_unit(walk, name, module, set(), adapter_names)
    return walk.items


def _survey(root: nn.Module) -> set[int]:
    """One pass over every module: refuse non-LoRA adapters; the ids of parameters held under
    several names (tied weights; LoRA factors are never tied, their containers are not entered)."""
    counts: dict[int, int] = {}
    for name, module in named_modules(root, remove_duplicate=False, skip_child=is_lora_factor_container):
        refuse_other_tuner(name, module)
        for param in module._parameters.values():
            if param is not None:
                counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}
