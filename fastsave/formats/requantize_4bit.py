"""save_method="merged_4bit_forced": the merged plan with its formerly 4-bit weights re-quantized.

Each weight the trained model held in 4-bit is merged exactly as for "merged_16bit" (same plan,
same producers, one rounding to the 16-bit output dtype), then quantized again with
``bitsandbytes.functional.quantize_4bit`` using the settings it was trained with (quant_type,
blocksize, double quantization, quant_storage). The result is what loading the merged 16-bit
checkpoint 4-bit with those settings would give, bit for bit, written in the layout a transformers
4-bit ``save_pretrained`` writes (``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``)::

    <module>.weight                                   packed 4-bit codes, shape (ceil(n/2) / storage bytes, 1)
    <module>.weight.absmax                            uint8 with double quantization, else float32
    <module>.weight.quant_map                         the 16 code values, float32
    <module>.weight.nested_absmax                     (double quantization) float32
    <module>.weight.nested_quant_map                  (double quantization) 256 float32
    <module>.weight.quant_state.bitsandbytes__<type>  the JSON of the non-tensor fields, as uint8

The writer needs every shape before any merge runs, but the JSON's length depends on a float
(the double-quantization offset). Its tensor gets a fixed length, that of the JSON with the
longest float repr, and the JSON is padded with spaces: ``json.loads`` (bitsandbytes'
``unpack_tensor_to_dict``) ignores trailing whitespace.

Re-quantizing throws away most of what the adapter learned (a LoRA delta is usually smaller than
one NF4 step), which is why a warning is logged and "merged_16bit" is the recommended save.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import replace
from typing import Any

import torch

from fastsave.dtypes import dtype_name
from fastsave.formats.registry import OutputFormat
from fastsave.io.finite import check_finite
from fastsave.merge.assemble import assemble
from fastsave.plan.items import Plan, PlanItem, SharedProducer
from fastsave.sources.settings_4bit import Quant4bitSettings

logger = logging.getLogger(__name__)

ACCURACY_WARNING = (
    "save_method='merged_4bit_forced' re-quantizes the merged weights to 4-bit: most of what the LoRA "
    "adapter learned is smaller than one quantization step and is lost, so this model will NOT compute "
    "what the trained model computed. Use 'merged_16bit' for inference or GGUF conversion (and quantize "
    "that, e.g. load it with load_in_4bit=True, if you need 4-bit), or 'lora' to keep the adapter."
)
# The longest repr of a Python float ("-2.2250738585072014e-308"): the offset's JSON never exceeds it.
_LONGEST_FLOAT = -2.2250738585072014e-308


def _state_json_length(shape: tuple[int, ...], dtype: torch.dtype, settings: Quant4bitSettings) -> int:
    fields: dict[str, Any] = {
        "quant_type": settings.quant_type,
        "blocksize": settings.blocksize,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
    }
    if settings.double_quant:
        fields.update(nested_blocksize=256, nested_dtype="float32", nested_offset=_LONGEST_FLOAT)
    return len(json.dumps(fields).encode("utf-8"))


def quantized_layout(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, settings: Quant4bitSettings
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor a 4-bit save writes for the weight ``name``, in write order.

    Raises:
        ValueError: the packed codes do not fill whole elements of ``quant_storage``.
    """
    n = math.prod(shape)
    packed_bytes = (n + 1) // 2
    storage_bytes = settings.quant_storage.itemsize
    if packed_bytes % storage_bytes:
        raise ValueError(
            f"{name}: {n} values do not pack into whole {settings.quant_storage} elements for 4-bit storage"
        )
    blocks = -(-n // settings.blocksize)
    layout = [(name, (packed_bytes // storage_bytes, 1), settings.quant_storage)]
    if settings.double_quant:
        layout += [
            (f"{name}.absmax", (blocks,), torch.uint8),
            (f"{name}.quant_map", (16,), torch.float32),
            (f"{name}.nested_absmax", (-(-blocks // 256),), torch.float32),
            (f"{name}.nested_quant_map", (256,), torch.float32),
        ]
    else:
        layout += [
            (f"{name}.absmax", (blocks,), torch.float32),
            (f"{name}.quant_map", (16,), torch.float32),
        ]
    json_length = _state_json_length(shape, dtype, settings)
    layout.append((f"{name}.quant_state.bitsandbytes__{settings.quant_type}", (json_length,), torch.uint8))
    return layout


class _QuantizedGroup:
    """The tensors of one re-quantized weight: the first part asked for quantizes, the rest hand out parts.

    ``transposed``: the checkpoint stores the weight (in, out) (a Conv1D) and transformers quantizes
    its transpose, so the transpose is quantized here too.
    """

    def __init__(self, source: PlanItem, settings: Quant4bitSettings, transposed: bool = False) -> None:
        self.source = source
        self.settings = settings
        self.transposed = transposed
        shape = source.shape[::-1] if transposed else source.shape
        self.layout = quantized_layout(source.name, shape, source.dtype, settings)
        self._shared = SharedProducer(self._quantize, source.participate)

    def _quantize(self) -> dict[str, torch.Tensor]:
        import bitsandbytes.functional as bnb_functional

        # merged, rounded once to the 16-bit output dtype (spilled to disk when the budget cannot hold
        # it); checked here, since NaN quantizes into codes the writer cannot see
        weight = assemble(self.source)
        check_finite(weight, self.source.name)
        if self.transposed:
            weight = weight.T.contiguous()
        codes, state = bnb_functional.quantize_4bit(
            weight,
            blocksize=self.settings.blocksize,
            compress_statistics=self.settings.double_quant,
            quant_type=self.settings.quant_type,
            quant_storage=self.settings.quant_storage,
        )
        del weight
        name = self.source.name
        parts = {name: codes}
        for key, value in state.as_dict(packed=True).items():
            parts[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
        state_key = self.layout[-1][0]
        packed_json = parts[state_key]
        reserved = self.layout[-1][1][0]
        if packed_json.numel() > reserved:  # cannot happen: the reservation holds the longest float
            raise RuntimeError(f"{state_key}: quant_state JSON of {packed_json.numel()} bytes > {reserved}")
        pad = torch.full((reserved - packed_json.numel(),), ord(" "), dtype=torch.uint8)
        parts[state_key] = torch.cat([packed_json, pad])
        expected = {n: (s, d) for n, s, d in self.layout}
        got = {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}
        if got != expected:
            raise RuntimeError(f"bitsandbytes wrote {got} for {name}, planned {expected}")
        return parts


def requantize_plan(plan: Plan) -> Plan:
    """The plan of a 4-bit save: every item that was a 4-bit weight becomes its 4-bit parts.

    The other items (norms, embeddings, biases, lm_head, ...) stay as planned, in 16-bit.
    """
    items: list[PlanItem] = []
    for item in plan.items:
        if item.requantize is None:
            items.append(item)
            continue
        group = _QuantizedGroup(item, item.requantize, item.requantize_transposed)
        for index, (name, shape, dtype) in enumerate(group.layout):
            first = index == 0  # the codes: they carry the census entry and the settings (summary, config)
            items.append(
                group._shared.item(
                    name,
                    shape,
                    dtype,
                    lora_module=item.lora_module if first else None,
                    source_kind=item.source_kind,
                    holds_codes=first,
                    requantize=item.requantize if first else None,
                )
            )
    return replace(plan, items=items)


def requantized_settings(plan: Plan) -> list[Quant4bitSettings]:
    """The distinct settings of the weights a 4-bit save re-quantizes."""
    return list(dict.fromkeys(item.requantize for item in plan.items if item.requantize is not None))


def warn_accuracy_loss() -> None:
    """Say, loudly, that a re-quantized merge does not compute what the trained model computed."""
    logger.warning("fastsave: WARNING: %s", ACCURACY_WARNING)
    warnings.warn(ACCURACY_WARNING, UserWarning, stacklevel=3)


def _transform(save_input: Any, plan: Plan) -> Plan:
    """Refuse a model without 4-bit settings (before any work), warn, re-quantize the plan."""
    save_input.quantization_config(plan)
    warn_accuracy_loss()
    return requantize_plan(plan)


def _summary(plan: Plan) -> list[str]:
    settings = requantized_settings(plan)
    count = sum(1 for item in plan.items if item.requantize is not None)
    return [f"  re-quantized {count} weights to 4-bit ({'; '.join(s.describe() for s in settings)})"]


FORMAT = OutputFormat(
    save_method="merged_4bit_forced",
    transform=_transform,
    quantization_config=lambda save_input, plan: save_input.quantization_config(plan),
    summary=_summary,
)
