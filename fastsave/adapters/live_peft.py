"""Deltas read from a live peft model: which modules carry adapters, and each adapter's tensors as data.

Each adapter layer's kind is decided here, once, by what it is (peft's own classes): a LoRA layer
(its factors become a LoraDelta), a layer of another tuner fastsave merges (its module in
fastsave.adapters reads a TunerDelta, fastsave.adapters.tuners), peft's trainable-tokens wrapper
around an embedding, or a tuner layer fastsave refuses. Every adapter feature fastsave cannot fold
in exactly is refused here, while planning, before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsave.adapters import tuners
from fastsave.adapters.delta import DeltaKind, LoraDelta, TunerDelta
from fastsave.adapters.tuner_reading import LayerFacts
from fastsave.collector import collection_paused
from fastsave.errors import PlanError, UnsupportedAdapterError
from fastsave.module_tree import named_modules
from fastsave.sources.backends import lora_layer_classes
from fastsave.sources.offloaded import offloaded_value
from fastsave.sources.sharded import clean_name

try:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Embedding as LoraEmbedding
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.lora.variants import DoraEmbeddingVariant, DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover - peft is a dependency
    LoraLayer = LoraEmbedding = LoraLinear = ParamWrapper = BaseTunerLayer = None
    DoraEmbeddingVariant = DoraLinearVariant = ()
try:
    from peft.utils.other import TrainableTokensWrapper
except ImportError:  # pragma: no cover - peft before trainable tokens
    TrainableTokensWrapper = None


# What a module class is, decided once per class: peft's layer classes are ABCs, whose isinstance
# checks cost far more than a dict lookup, and planning asks for every module of the model.
_ROLE_OF_CLASS: dict[type, str | None] = {}


def _role(module: nn.Module) -> str | None:
    """ "lora", "param" (LoRA on a bare parameter), "tuner" (another tuner fastsave merges),
    "tokens" (peft's trainable-tokens wrapper), "refused" (a tuner fastsave does not merge), or None."""
    cls = type(module)
    if cls in _ROLE_OF_CLASS:
        return _ROLE_OF_CLASS[cls]
    role = None
    tuner = tuners.tuner_of(cls)
    if TrainableTokensWrapper is not None and issubclass(cls, TrainableTokensWrapper):
        role = "tokens"
    elif BaseTunerLayer is not None and issubclass(cls, BaseTunerLayer):
        if tuner in tuners.READERS:  # before LoRA: AdaLoRA's layers are LoRA layers by class
            role = "tuner"
        elif ParamWrapper is not None and issubclass(cls, ParamWrapper):
            role = "param"
        elif LoraLayer is not None and issubclass(cls, LoraLayer):
            role = "lora"
        else:
            role = "refused"
    _ROLE_OF_CLASS[cls] = role
    return role


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (Linear, Embedding, Conv, quantized variants, ParamWrapper)."""
    return _role(module) in ("lora", "param")


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a layer the walk merges with its base layer: LoRA, or another tuner fastsave merges."""
    return _role(module) in ("lora", "param", "tuner")


def is_param_wrapper(module: nn.Module) -> bool:
    """True for peft's LoRA on a bare parameter (``target_parameters``: fused MoE experts, routers)."""
    return _role(module) == "param"


def is_tokens_wrapper(module: nn.Module) -> bool:
    """True for peft's trainable-tokens wrapper (``trainable_token_indices`` beside LoRA): its
    ``token_adapter`` is the tuner layer, around the embedding."""
    return _role(module) == "tokens"


def is_other_tuner_layer(module: nn.Module) -> bool:
    """True for a peft tuner layer of a method fastsave does not merge (refused)."""
    return _role(module) == "refused"


def base_layer_of(layer: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a peft layer, as its ``get_base_layer()`` finds it (read from
    the module dicts: peft's loop misses an attribute through nn.Module.__getattr__ at every level)."""
    base = layer
    while (inner := base._modules.get("base_layer")) is not None:
        base = inner
    return base


def is_lora_factor_container(key: str, module: nn.Module) -> bool:
    """True for a LoRA layer's dict of factors, dropouts or magnitudes (``lora_A``, ``lora_dropout``...):
    passes that look for layers, adapters or tied weights need not enter them."""
    return key.startswith("lora_") and isinstance(module, (nn.ModuleDict, nn.ParameterDict))


def refuse_other_tuner(name: str, module: nn.Module) -> None:
    """Refuse ``module`` when it is a non-LoRA adapter layer: a 'merged' save must not hold it unmerged.

    Raises:
        UnsupportedAdapterError: naming the layer and its method.
    """
    if is_other_tuner_layer(module):
        kind = type(module)
        tuner = tuners.tuner_of(kind)
        why = tuners.REFUSED.get(tuner or "", "fastsave has no exact merge for this tuner")
        raise UnsupportedAdapterError(
            f"{clean_name(name)} is a {tuners.title(tuner)} adapter layer ({kind.__module__}.{kind.__name__}): "
            f"{why}. fastsave will not write this model unmerged under a 'merged' save; save this adapter "
            "with save_method='lora'"
        )


def select_adapters(
    layer: nn.Module, adapter_names: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the adapters of a layer into (to add now, already merged into the base weight)."""
    present = adapter_names_of(layer)
    wanted = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
    merged_before = getattr(layer, "merged_adapters", None)
    if not merged_before:  # the common case, without the second filter
        return tuple([a for a in wanted if a in present]), ()
    merged = tuple(a for a in merged_before if a in present and a in wanted)
    to_add = tuple(a for a in wanted if a in present and a not in merged)
    return to_add, merged


_FACTOR_CONTAINERS = ("lora_A", "lora_embedding_A")


def adapter_names_of(module: nn.Module) -> set[str]:
    """The adapter names of the module's adapter containers (LoRA's ``lora_A`` / ``lora_embedding_A``,
    another merged tuner's own, e.g. ``ia3_l``), if it has any.

    Looked up where nn.Module keeps them, not through its __getattr__ (slow on a miss, and this runs
    on every module of the model): a submodule (peft's ModuleDict, ParameterDict), else a plain
    attribute holding a dict.
    """
    containers = type(module).adapter_layer_names if _role(module) == "tuner" else _FACTOR_CONTAINERS
    holders = [module._modules.get(attr) for attr in containers]
    if all(holder is None for holder in holders):
        own = module.__dict__
        if not any(attr in own for attr in containers):
            return set()  # the common case: no factors here
        holders = [own.get(attr) for attr in containers]
    keys: set[str] = set()
    for holder in holders:
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict, dict)):
            keys.update(holder.keys())
    return keys


def lora_module_census(
    root: nn.Module, adapter_names: Sequence[str] | None, tied: set[int] | None = None
) -> list[str]:
    """Names of every module that holds LoRA weights for a selected adapter.

    Deliberately independent of the plan walk: it looks only for ``lora_A`` / ``lora_embedding_A``
    containers, whatever class the module has, so the plan's check catches a module the walk skips.
    The same pass refuses non-LoRA adapter layers (:func:`refuse_other_tuner`), before the census
    could report that there is no LoRA to merge. With ``tied``, it also collects there the ids of
    parameters held under several names (tied weights, for the walk), so that a large model is
    not traversed twice.
    """
    with collection_paused():  # a pass over every module allocates plenty and frees nothing to collect
        return _census(root, adapter_names, tied)


def _census(root: nn.Module, adapter_names: Sequence[str] | None, tied: set[int] | None) -> list[str]:
    names = []
    counts: dict[int, int] = {}  # parameter id -> the names it is reached under
    seen: set[int] = set()
    # every name of a module reached under several is visited when tied weights are looked for
    for name, module in named_modules(
        root, remove_duplicate=tied is None, skip_child=is_lora_factor_container
    ):
        if tied is not None:
            for param in module._parameters.values():
                if param is not None:
                    counts[id(param)] = counts.get(id(param), 0) + 1
            if id(module) in seen:  # the census counts a module once, under its first name
                continue
            seen.add(id(module))
        refuse_other_tuner(name, module)
        keys = adapter_names_of(module)
        if not keys:
            continue
        if adapter_names is not None:
            wanted = set(adapter_names)
        else:
            active = getattr(module, "active_adapter", None)
            wanted = {active} if isinstance(active, str) else set(active or ())
        if keys & wanted:
            names.append(clean_name(name))
    if tied is not None:
        tied.update(key for key, count in counts.items() if count > 1)
    return names


_KIND_OF_CLASS: dict[type, DeltaKind | None] = {}


def _kind_of_class(cls: type) -> DeltaKind | None:
    if cls not in _KIND_OF_CLASS:
        kind: DeltaKind | None = None
        if ParamWrapper is not None and issubclass(cls, ParamWrapper):
            kind = "param"
        elif issubclass(cls, LoraEmbedding):
            kind = "embedding"
        elif issubclass(cls, (LoraLinear, *lora_layer_classes())):
            kind = "linear"
        _KIND_OF_CLASS[cls] = kind
    return _KIND_OF_CLASS[cls]


def layer_kind(layer: nn.Module, name: str) -> DeltaKind:
    """The kind of delta a LoRA layer adds, from its class.

    Raises:
        UnsupportedAdapterError: LoRA on a layer kind fastsave does not merge (convolutions,
            attention, quantization backends it cannot read).
    """
    kind = _kind_of_class(type(layer))
    if kind is not None:
        return kind
    raise UnsupportedAdapterError(
        f"LoRA on {name} ({type(layer).__module__}.{type(layer).__name__}) is not supported by fastsave's "
        "merge; save it with save_method='lora'"
    )


def _value(module: nn.Module, attr: str, where: tuple[str, ...], meta_ok: bool = False) -> torch.Tensor:
    """``module.<attr>``, read from accelerate's offload map when the model left it on the meta device.

    ``where``: the parts of its name for an error (joined only then: this runs per LoRA factor).
    ``meta_ok``: a placeholder of a sharded model, planned from its shape only: kept as it is.
    """
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = getattr(module, attr)
    if meta_ok or not tensor.is_meta:
        return tensor
    value = offloaded_value(module, attr)
    if value is None:
        raise PlanError(
            f"{'.'.join(where)} is on the meta device and nothing holds its values (not offloaded by accelerate): "
            "load the model fully, or save the adapter with save_method='lora' and merge it with "
            "`fastsave merge ADAPTER_DIR OUT_DIR`. Nothing was written."
        )
    return value


def _check_variant(layer: nn.Module, adapter: str, where: str) -> bool:
    """True for DoRA; raise for any other LoRA variant."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None:
        return False
    if isinstance(variant, (DoraLinearVariant, DoraEmbeddingVariant)):
        return True
    raise UnsupportedAdapterError(
        f"adapter {adapter!r} on {where} ({type(layer).__name__}) uses the LoRA variant {type(variant).__name__}, which fastsave "
        "cannot merge exactly yet; save it with save_method='lora' instead"
    )


def delta_of(
    layer: nn.Module, adapter: str, name: str, has_base_bias: bool, meta_ok: bool = False
) -> LoraDelta:
    """One adapter's delta on a live peft LoRA layer, with every unsupported feature refused.

    ``meta_ok``: the layer holds placeholders (a sharded model planned from shapes only): the delta
    is checked and described, its factors are the placeholders.

    Raises:
        UnsupportedAdapterError: a LoRA variant other than DoRA, lora_bias without a base bias, a
            layer kind fastsave does not merge.
    """
    kind = _kind_of_class(type(layer)) or layer_kind(layer, f"{name} ({type(layer).__name__})")
    dora = _check_variant(layer, adapter, name)
    scaling = float(layer.scaling[adapter])
    modules = layer._modules
    if kind == "embedding":
        a = _value(modules["lora_embedding_A"], adapter, (name, "lora_embedding_A", adapter), meta_ok)
        b = _value(modules["lora_embedding_B"], adapter, (name, "lora_embedding_B", adapter), meta_ok)
        bias = None
    else:
        lora_a, lora_b = modules["lora_A"][adapter], modules["lora_B"][adapter]
        a = _value(lora_a, "weight", (name, "lora_A", adapter, "weight"), meta_ok)
        b = _value(lora_b, "weight", (name, "lora_B", adapter, "weight"), meta_ok)
        bias = None
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            where = f"{name} ({type(layer).__name__})"
            if not has_base_bias:
                raise UnsupportedAdapterError(
                    f"adapter {adapter!r} on {where} was trained with lora_bias=True, but the base layer has "
                    "no bias, so a plain checkpoint of this architecture has nowhere to put it (peft cannot "
                    "merge it either); save it with save_method='lora' instead"
                )
            bias = _value(lora_b, "bias", (name, "lora_B", adapter, "bias"), meta_ok)
    magnitude = None
    if dora:
        holder = layer.lora_magnitude_vector[adapter]
        magnitude = _value(holder, "weight", (name, "lora_magnitude_vector", adapter), meta_ok)
    return LoraDelta(
        adapter=adapter,
        kind=kind,
        lora_a=a,
        lora_b=b,
        scaling=scaling,
        # only peft's plain Linear transposes by fan_in_fan_out; its quantized variants never do
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)) and issubclass(type(layer), LoraLinear),
        magnitude=magnitude,
        bias=bias,
        num_experts=int(getattr(layer, "num_experts", 1)) if kind == "param" else 1,
        experts_out_in=bool(getattr(layer, "_did_swap_in_out_features", False)) if kind == "param" else False,
    )


def _base_shape(base: nn.Module) -> tuple[int, ...]:
    """The base weight's shape in the layout the merge runs in (a packed 4-bit weight's is not)."""
    if isinstance(base, nn.Embedding):
        return (int(base.num_embeddings), int(base.embedding_dim))
    if isinstance(getattr(base, "out_features", None), int) and isinstance(
        getattr(base, "in_features", None), int
    ):
        return (base.out_features, base.in_features)
    weight = base._parameters.get("weight")
    return tuple(weight.shape) if weight is not None else ()


def tuner_delta_of(
    layer: nn.Module, adapter: str, name: str, has_base_bias: bool, meta_ok: bool = False
) -> TunerDelta:
    """One adapter's delta on a layer of another tuner fastsave merges (fastsave.adapters.tuners).

    Raises:
        UnsupportedAdapterError: what that tuner's module cannot merge exactly, with the reason.
    """
    base = base_layer_of(layer)
    facts = LayerFacts(
        name=name,
        base_shape=_base_shape(base),
        has_base_bias=has_base_bias,
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
        is_embedding=isinstance(base, nn.Embedding),
    )

    def fetch(holder: object, key: str, holder_name: str) -> torch.Tensor:
        return _value(holder, key, (name, holder_name, key), meta_ok)

    return tuners.READERS[tuners.tuner_of(type(layer))](layer, adapter, facts, fetch)


def deltas_of(
    layer: nn.Module,
    adapters: Sequence[str],
    already_merged: Sequence[str],
    name: str,
    has_base_bias: bool,
    meta_ok: bool = False,
) -> tuple[LoraDelta | TunerDelta, ...]:
    """The deltas of ``adapters`` on ``layer``, in peft's order (``meta_ok``: see :func:`delta_of`).

    Raises:
        UnsupportedAdapterError: see :func:`delta_of` and :func:`tuner_delta_of`; also DoRA on top of
            adapters already merged into the base weight (DoRA's norm needs the unmerged weight).
    """
    read = tuner_delta_of if _role(layer) == "tuner" else delta_of
    deltas = tuple(read(layer, adapter, name, has_base_bias, meta_ok) for adapter in adapters)
    if already_merged and any(d.is_dora for d in deltas):
        raise UnsupportedAdapterError(
            f"{name}: DoRA adapter(s) {list(adapters)} would be merged on top of adapters already merged into "
            f"the base weight ({list(already_merged)}), but DoRA's norm needs the unmerged weight; call "
            "model.unmerge_adapter() first, or save with save_method='lora'"
        )
    return deltas
