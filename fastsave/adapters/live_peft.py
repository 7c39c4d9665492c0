"""Deltas read from a live peft model: which modules carry LoRA, and each adapter's factors as data.

Each LoRA layer's kind is decided here, once, by what it is (peft's own classes), and every
adapter feature fastsave cannot fold in exactly is refused here, while planning, before anything
is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsave.adapters.delta import DeltaKind, LoraDelta
from fastsave.errors import PlanError, UnsupportedAdapterError
from fastsave.plan.module_tree import named_modules
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


def _optional_class(module_path: str, name: str) -> type | None:
    try:
        module = __import__(module_path, fromlist=[name])
    except ImportError:
        return None
    return getattr(module, name, None)


# LoRA layers over a linear base whose weight fastsave reads (fastsave.sources): the delta is B @ A.
_QUANTIZED_LINEAR_LAYERS = tuple(
    cls
    for cls in (
        _optional_class("peft.tuners.lora.bnb", "Linear4bit"),
        _optional_class("peft.tuners.lora.bnb", "Linear8bitLt"),
        _optional_class("peft.tuners.lora.hqq", "HqqLoraLinear"),
    )
    if cls is not None
)


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (Linear, Embedding, Conv, quantized variants, ParamWrapper)."""
    return LoraLayer is not None and isinstance(module, LoraLayer)


def is_param_wrapper(module: nn.Module) -> bool:
    """True for peft's LoRA on a bare parameter (``target_parameters``: fused MoE experts, routers)."""
    return ParamWrapper is not None and isinstance(module, ParamWrapper)


def is_other_tuner_layer(module: nn.Module) -> bool:
    """True for a peft tuner layer of another method (IA3, LoHa, LoKr, ...), which fastsave refuses."""
    return BaseTunerLayer is not None and isinstance(module, BaseTunerLayer) and not is_lora_layer(module)


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
        parts = kind.__module__.split(".")
        method = parts[2].upper() if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else "non-LoRA"
        raise UnsupportedAdapterError(
            f"{clean_name(name)} is a {method} adapter layer ({kind.__module__}.{kind.__name__}): fastsave "
            "merges LoRA (and DoRA) adapters only, and will not write this model unmerged under a 'merged' "
            "save; save this adapter with save_method='lora'"
        )


def _adapter_keys(layer: nn.Module) -> set[str]:
    return set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def select_adapters(
    layer: nn.Module, adapter_names: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the adapters of a layer into (to add now, already merged into the base weight)."""
    present = _adapter_keys(layer)
    wanted = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
    merged = tuple(a for a in getattr(layer, "merged_adapters", []) if a in present and a in wanted)
    to_add = tuple(a for a in wanted if a in present and a not in merged)
    return to_add, merged


def lora_module_census(root: nn.Module, adapter_names: Sequence[str] | None) -> list[str]:
    """Names of every module that holds LoRA weights for a selected adapter.

    Deliberately independent of the plan walk: it looks only for ``lora_A`` / ``lora_embedding_A``
    containers, whatever class the module has, so the plan's check catches a module the walk skips.
    The same pass refuses non-LoRA adapter layers (:func:`refuse_other_tuner`), before the census
    could report that there is no LoRA to merge.
    """
    names = []
    for name, module in named_modules(root, skip_child=is_lora_factor_container):
        refuse_other_tuner(name, module)
        keys: set[str] = set()
        for attr in ("lora_A", "lora_embedding_A"):
            # looked up where nn.Module keeps it, not through its __getattr__ (slow on a miss, and
            # this runs on every module of the model)
            holder = module._modules.get(attr, module.__dict__.get(attr))
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict, dict)):
                keys |= set(holder.keys())
        if not keys:
            continue
        if adapter_names is not None:
            wanted = set(adapter_names)
        else:
            active = getattr(module, "active_adapter", None)
            wanted = {active} if isinstance(active, str) else set(active or ())
        if keys & wanted:
            names.append(clean_name(name))
    return names


def layer_kind(layer: nn.Module, name: str) -> DeltaKind:
    """The kind of delta a LoRA layer adds, from its class.

    Raises:
        UnsupportedAdapterError: LoRA on a layer kind fastsave does not merge (convolutions,
            attention, quantization backends it cannot read).
    """
    if is_param_wrapper(layer):
        return "param"
    if isinstance(layer, LoraEmbedding):
        return "embedding"
    if isinstance(layer, (LoraLinear, *_QUANTIZED_LINEAR_LAYERS)):
        return "linear"
    raise UnsupportedAdapterError(
        f"LoRA on {name} ({type(layer).__module__}.{type(layer).__name__}) is not supported by fastsave's "
        "merge; save it with save_method='lora'"
    )


def _value(module: nn.Module, attr: str, where: str, meta_ok: bool = False) -> torch.Tensor:
    """``module.<attr>``, read from accelerate's offload map when the model left it on the meta device.

    ``meta_ok``: a placeholder of a sharded model, planned from its shape only: kept as it is.
    """
    tensor = getattr(module, attr)
    if tensor.device.type != "meta" or meta_ok:
        return tensor
    value = offloaded_value(module, attr)
    if value is None:
        raise PlanError(
            f"{where} is on the meta device and nothing holds its values (not offloaded by accelerate): "
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
        f"adapter {adapter!r} on {where} uses the LoRA variant {type(variant).__name__}, which fastsave "
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
    where = f"{name} ({type(layer).__name__})"
    kind = layer_kind(layer, where)
    dora = _check_variant(layer, adapter, where)
    scaling = float(layer.scaling[adapter])
    if kind == "embedding":
        a = _value(layer.lora_embedding_A, adapter, f"{name}.lora_embedding_A.{adapter}", meta_ok)
        b = _value(layer.lora_embedding_B, adapter, f"{name}.lora_embedding_B.{adapter}", meta_ok)
        bias = None
    else:
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        a = _value(lora_a, "weight", f"{name}.lora_A.{adapter}.weight", meta_ok)
        b = _value(lora_b, "weight", f"{name}.lora_B.{adapter}.weight", meta_ok)
        bias = None
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            if not has_base_bias:
                raise UnsupportedAdapterError(
                    f"adapter {adapter!r} on {where} was trained with lora_bias=True, but the base layer has "
                    "no bias, so a plain checkpoint of this architecture has nowhere to put it (peft cannot "
                    "merge it either); save it with save_method='lora' instead"
                )
            bias = _value(lora_b, "bias", f"{name}.lora_B.{adapter}.bias", meta_ok)
    magnitude = None
    if dora:
        holder = layer.lora_magnitude_vector[adapter]
        magnitude = _value(holder, "weight", f"{name}.lora_magnitude_vector.{adapter}", meta_ok)
    return LoraDelta(
        adapter=adapter,
        kind=kind,
        lora_a=a,
        lora_b=b,
        scaling=scaling,
        # only peft's plain Linear transposes by fan_in_fan_out; its quantized variants never do
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)) and isinstance(layer, LoraLinear),
        magnitude=magnitude,
        bias=bias,
        num_experts=int(getattr(layer, "num_experts", 1)) if kind == "param" else 1,
        experts_out_in=bool(getattr(layer, "_did_swap_in_out_features", False)) if kind == "param" else False,
    )


def deltas_of(
    layer: nn.Module,
    adapters: Sequence[str],
    already_merged: Sequence[str],
    name: str,
    has_base_bias: bool,
    meta_ok: bool = False,
) -> tuple[LoraDelta, ...]:
    """The deltas of ``adapters`` on ``layer``, in peft's order (``meta_ok``: see :func:`delta_of`).

    Raises:
        UnsupportedAdapterError: see :func:`delta_of`; also DoRA on top of adapters already merged
            into the base weight (DoRA's norm needs the unmerged weight).
    """
    deltas = tuple(delta_of(layer, adapter, name, has_base_bias, meta_ok) for adapter in adapters)
    if already_merged and any(d.is_dora for d in deltas):
        raise UnsupportedAdapterError(
            f"{name}: DoRA adapter(s) {list(adapters)} would be merged on top of adapters already merged into "
            f"the base weight ({list(already_merged)}), but DoRA's norm needs the unmerged weight; call "
            "model.unmerge_adapter() first, or save with save_method='lora'"
        )
    return deltas
