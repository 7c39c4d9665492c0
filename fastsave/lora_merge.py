"""The LoRA arithmetic: which modules carry adapters, and W + delta in float32 for one of them.

The delta is peft's own definition (``get_delta_weight``): ``transpose(B @ A, fan_in_fan_out) *
scaling`` for linear layers, ``(B @ A).T * scaling`` for embeddings, with the scaling peft stored
(alpha / r, or alpha / sqrt(r) with rslora). It is computed here in float32 whatever dtype the
adapter weights are kept in, and added in the same order peft adds it (one adapter after another),
so the result equals peft's merge on a float32 dequantized copy bit for bit. The caller rounds
once, to the output dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastsave.quantized import base_weight_float32, is_4bit, use_kernels

try:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover - peft is a dependency
    LoraLayer = BaseTunerLayer = None


class UnsupportedAdapterError(ValueError):
    """An adapter fastsave cannot fold into the base weights exactly."""


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-wrapped module and the adapters that will be folded into it."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    layer: nn.Module  # the peft LoraLayer
    adapters: tuple[str, ...]  # adapters to add now, in peft's order
    already_merged: tuple[str, ...]  # adapters whose delta the base weight already holds


def _lora_adapter_keys(layer: nn.Module) -> set[str]:
    return set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (Linear, Embedding, Conv, bnb variants)."""
    return LoraLayer is not None and isinstance(module, LoraLayer)


def is_param_wrapper(module: nn.Module) -> bool:
    """True for peft's LoRA on a bare parameter (``target_parameters``: fused MoE experts, routers)."""
    return is_lora_layer(module) and type(module).__name__ == "ParamWrapper"


def is_other_tuner_layer(module: nn.Module) -> bool:
    """True for a peft tuner layer of another method (IA3, LoHa, LoKr, ...), which fastsave refuses."""
    return BaseTunerLayer is not None and isinstance(module, BaseTunerLayer) and not is_lora_layer(module)


def select_adapters(
    layer: nn.Module, adapter_names: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the adapters of a layer into (to add now, already merged into the base weight)."""
    present = _lora_adapter_keys(layer)
    wanted = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
    merged = tuple(a for a in getattr(layer, "merged_adapters", []) if a in present and a in wanted)
    to_add = tuple(a for a in wanted if a in present and a not in merged)
    return to_add, merged


def find_lora_targets(root: nn.Module, adapter_names: Sequence[str] | None) -> list[LoraTarget]:
    """Every LoRA layer under ``root`` that has at least one selected adapter, in module order."""
    targets = []
    for name, module in root.named_modules():
        if is_lora_layer(module):
            to_add, merged = select_adapters(module, adapter_names)
            if to_add or merged:
                targets.append(LoraTarget(name, module, to_add, merged))
    return targets


def _check_supported(layer: nn.Module, adapter: str, name: str = "") -> None:
    where = f"{name} ({type(layer).__name__})" if name else type(layer).__name__
    variants = getattr(layer, "lora_variant", {})
    if adapter in variants:
        variant = type(variants[adapter]).__name__
        if variant not in ("DoraLinearVariant", "DoraEmbeddingVariant"):
            raise UnsupportedAdapterError(
                f"adapter {adapter!r} on {where} uses the LoRA variant {variant}, which fastsave "
                "cannot merge exactly yet; save it with save_method='lora' instead"
            )
    kind = type(layer).__name__
    if kind not in ("Linear", "Linear4bit", "Linear8bitLt", "Embedding", "ParamWrapper"):
        raise UnsupportedAdapterError(
            f"LoRA on {where} is not supported by fastsave's merge yet; save it with save_method='lora'"
        )
    if (
        getattr(layer, "lora_bias", {}).get(adapter, False)
        and getattr(layer.get_base_layer(), "bias", None) is None
    ):
        raise UnsupportedAdapterError(
            f"adapter {adapter!r} on {where} was trained with lora_bias=True, but the base layer has no bias, "
            "so a plain checkpoint of this architecture has nowhere to put it (peft cannot merge it either); "
            "save it with save_method='lora' instead"
        )


def check_supported(target: LoraTarget) -> None:
    """Raise :class:`UnsupportedAdapterError` unless every selected adapter of ``target`` merges exactly.

    Called while planning, so that nothing is written for an adapter fastsave cannot fold in.
    """
    for adapter in target.adapters:
        _check_supported(target.layer, adapter, target.name)
    if target.already_merged and any(_is_dora(target.layer, a) for a in target.adapters):
        raise UnsupportedAdapterError(
            f"{target.name}: DoRA adapter(s) {list(target.adapters)} would be merged on top of adapters already "
            f"merged into the base weight ({list(target.already_merged)}), but DoRA's norm needs the unmerged "
            "weight; call model.unmerge_adapter() first, or save with save_method='lora'"
        )


def lora_delta_float32(layer: nn.Module, adapter: str, device: torch.device) -> torch.Tensor:
    """peft's delta for one adapter, computed in float32, in the base weight's layout."""
    scaling = layer.scaling[adapter]
    if adapter in getattr(layer, "lora_embedding_A", {}):
        a = layer.lora_embedding_A[adapter].detach().to(device=device, dtype=torch.float32)
        b = layer.lora_embedding_B[adapter].detach().to(device=device, dtype=torch.float32)
        return (b @ a).T * scaling
    a = layer.lora_A[adapter].weight.detach().to(device=device, dtype=torch.float32)
    b = layer.lora_B[adapter].weight.detach().to(device=device, dtype=torch.float32)
    delta = b @ a
    if getattr(layer, "fan_in_fan_out", False) and type(layer).__name__ == "Linear":
        delta = delta.T
    return delta * scaling


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_variant", {})


def _dora_rescale(
    layer: nn.Module, adapter: str, base: torch.Tensor, current: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """DoRA: magnitude / ||W_base + delta|| (row norms, as peft computes them) times (W + delta)."""
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False) and type(layer).__name__ == "Linear"
    magnitude = (
        layer.lora_magnitude_vector[adapter].weight.detach().to(device=base.device, dtype=torch.float32)
    )
    if type(layer).__name__ == "Embedding":
        # peft's DoraEmbeddingLayer: norm over dim 0 of (W + delta).T, i.e. per embedding column
        norm = (base + delta).T.norm(p=2, dim=1, keepdim=True).T
        return (magnitude / norm) * (current + delta)
    base_t = base.T if fan_in_fan_out else base
    delta_t = delta.T if fan_in_fan_out else delta
    norm = torch.linalg.norm(base_t + 1 * delta_t, dim=1)
    factor = (magnitude / norm).view(-1, 1)
    if fan_in_fan_out:
        factor = factor.T
    return factor * (current + delta)


def param_wrapper_delta_float32(layer: nn.Module, adapter: str, device: torch.device) -> torch.Tensor:
    """peft's ParamWrapper delta for one adapter, in float32, in the wrapped parameter's layout.

    A 2D parameter (a router) takes the Linear delta B @ A. A 3D expert stack holds one rank-r pair
    a expert: A is (experts * r, in), B is (out, r * experts), paired as peft's einsum pairs them,
    with the (experts, in, out) or (experts, out, in) order peft chose for the parameter.
    """
    a = layer.lora_A[adapter].weight.detach().to(device=device, dtype=torch.float32)
    b = layer.lora_B[adapter].weight.detach().to(device=device, dtype=torch.float32)
    scaling = layer.scaling[adapter]
    if layer.num_experts == 1:
        return (b @ a) * scaling
    a = a.reshape(layer.num_experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, layer.num_experts)
    order = "e o i" if layer._did_swap_in_out_features else "e i o"
    return torch.einsum(f"o r e, e r i -> {order}", b, a) * scaling


def _param_wrapper_merged_float32(target: LoraTarget) -> torch.Tensor:
    param = target.layer.get_param().detach()
    if not param.is_floating_point():
        raise UnsupportedAdapterError(
            f"LoRA on {target.name} wraps a {param.dtype} parameter (quantized?), which fastsave cannot "
            "merge; save it with save_method='lora'"
        )
    weight = param.to(torch.float32, copy=True)
    for adapter in target.adapters:
        weight.add_(param_wrapper_delta_float32(target.layer, adapter, weight.device))
    return weight


def merged_weight_float32(target: LoraTarget) -> torch.Tensor:
    """W + every selected adapter's delta, in float32, on the layer's device; the model is untouched.

    For peft's ParamWrapper, W is the wrapped parameter (``layer.get_param()``).
    """
    layer = target.layer
    base_layer = layer.get_base_layer()
    check_supported(target)
    if is_param_wrapper(layer):
        return _param_wrapper_merged_float32(target)
    fused = _fused_merge(target)
    if fused is not None:
        return fused
    weight = base_weight_float32(base_layer)
    base = weight.clone() if any(_is_dora(layer, a) for a in target.adapters) else None
    for adapter in target.adapters:
        delta = lora_delta_float32(layer, adapter, weight.device)
        if _is_dora(layer, adapter):
            weight = _dora_rescale(layer, adapter, base, weight, delta)
        else:
            weight.add_(delta)
    return weight


def _fused_merge(target: LoraTarget) -> torch.Tensor | None:
    """On CUDA, one Triton kernel for dequantize + a single plain LoRA delta (None: use the torch path).

    The kernel reads the 4-bit codes once and writes W + scaling * B @ A in float32 with the same
    op order as the torch path; only the order of the rank-r sum inside the dot may differ
    (fastsave.kernels.merge_lora_4bit documents the bound).
    """
    layer = target.layer
    base_layer = layer.get_base_layer()
    if len(target.adapters) != 1 or type(layer).__name__ != "Linear4bit" or not is_4bit(base_layer):
        return None
    adapter = target.adapters[0]
    weight = base_layer.weight
    if _is_dora(layer, adapter) or getattr(weight.quant_state, "packing_format_for_cpu", False):
        return None
    if not use_kernels(weight.data):
        return None
    from fastsave import kernels

    return kernels.merge_lora_4bit(
        weight.data,
        weight.quant_state,
        layer.lora_A[adapter].weight.detach(),
        layer.lora_B[adapter].weight.detach(),
        layer.scaling[adapter],
        dtype=torch.float32,
    )


def row_block_deltas(target: LoraTarget) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """``(B, A, scaling)`` in float32 per adapter, for a merge by row blocks; None where it does not apply.

    Applies to plain LoRA on a linear layer in (out, in) layout: not DoRA (its norm needs whole
    rows of W + delta, and its rescale a second pass), not embeddings, not fan_in_fan_out.
    """
    layer = target.layer
    if type(layer).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
        return None
    if getattr(layer, "fan_in_fan_out", False) and type(layer).__name__ == "Linear":
        return None
    deltas = []
    for adapter in target.adapters:
        if _is_dora(layer, adapter) or adapter not in layer.lora_A:
            return None
        a = layer.lora_A[adapter].weight.detach().to(device="cpu", dtype=torch.float32)
        b = layer.lora_B[adapter].weight.detach().to(device="cpu", dtype=torch.float32)
        deltas.append((b, a, layer.scaling[adapter]))
    return deltas


def merged_bias_float32(target: LoraTarget) -> torch.Tensor | None:
    """The base bias plus, for adapters trained with lora_bias, lora_B.bias * scaling (peft's merge)."""
    base_layer = target.layer.get_base_layer()
    bias = getattr(base_layer, "bias", None)
    if bias is None:
        return None
    out = bias.detach().to(torch.float32, copy=True)
    for adapter in target.adapters:
        if getattr(target.layer, "lora_bias", {}).get(adapter, False):
            lora_b = target.layer.lora_B[adapter]
            out += (
                lora_b.bias.detach().to(device=out.device, dtype=torch.float32)
                * target.layer.scaling[adapter]
            )
    return out


def adapter_names_in(root: nn.Module) -> Iterable[str]:
    """All LoRA adapter names present anywhere under ``root``."""
    names: set[str] = set()
    for module in root.modules():
        if is_lora_layer(module):
            names |= _lora_adapter_keys(module)
    return sorted(names)
