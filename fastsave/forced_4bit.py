"""save_method="merged_4bit_forced": merge in 16-bit, then re-quantize the formerly 4-bit weights.

Each weight the model held in 4-bit is merged exactly as for "merged_16bit" (same plan, same
producers, one rounding to the 16-bit output dtype), then quantized again with
``bitsandbytes.functional.quantize_4bit`` using that module's own settings (quant_type,
blocksize, double quantization, quant_storage). The result is what loading the merged 16-bit
checkpoint 4-bit with those settings would give, bit for bit, written in the layout a transformers
4-bit ``save_pretrained`` writes (``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``)::

    <module>.weight                                   packed 4-bit codes, shape (ceil(n/2) / storage bytes, 1)
    <module>.weight.absmax                            uint8 with double quantization, else float32
    <module>.weight.quant_map                         the 16 code values, float32
    <module>.weight.nested_absmax                     (double quantization) float32
    <module>.weight.nested_quant_map                  (double quantization) 256 float32
    <module>.weight.quant_state.bitsandbytes__<type>  the JSON of the non-tensor fields, as uint8

config.json keeps a quantization_config, so ``from_pretrained`` loads the result 4-bit.

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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsave.checkpoint_names import to_checkpoint_names
from fastsave.io.checkpoint_files import DTYPE_NAMES, write_config, write_generation_config, write_tokenizer
from fastsave.options import SaveOptions
from fastsave.original_base import weight_sources
from fastsave.plan import PlannedTensor, SavePlan, SharedProducer, unwrap_peft
from fastsave.quantized import is_4bit, stored_transposed

logger = logging.getLogger("fastsave")

ACCURACY_WARNING = (
    "save_method='merged_4bit_forced' re-quantizes the merged weights to 4-bit: most of what the LoRA "
    "adapter learned is smaller than one quantization step and is lost, so this model will NOT compute "
    "what the trained model computed. Use 'merged_16bit' for inference or GGUF conversion (and quantize "
    "that, e.g. load it with load_in_4bit=True, if you need 4-bit), or 'lora' to keep the adapter."
)
# The longest repr of a Python float ("-2.2250738585072014e-308"): the offset's JSON never exceeds it.
_LONGEST_FLOAT = -2.2250738585072014e-308


@dataclass(frozen=True)
class Quant4bitSettings:
    """How one weight is quantized: the arguments of ``bitsandbytes.functional.quantize_4bit``."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got {self.blocksize}"
            )


def settings_of(module: nn.Module) -> Quant4bitSettings:
    """The settings a bitsandbytes Linear4bit was quantized with (also after bitsandbytes' CPU repacking)."""
    weight = module.weight
    state = weight.quant_state
    repacked = getattr(state, "packing_format_for_cpu", False)
    nested = getattr(state, "original_nested", state.nested) if repacked else state.nested
    storage = getattr(weight, "quant_storage", None)
    if storage is None:
        storage = getattr(state, "original_storage_type", None) or (torch.uint8 if repacked else weight.dtype)
    return Quant4bitSettings(state.quant_type, int(state.blocksize), bool(nested), storage)


def _state_json_length(shape: tuple[int, ...], dtype: torch.dtype, settings: Quant4bitSettings) -> int:
    fields: dict[str, Any] = {
        "quant_type": settings.quant_type,
        "blocksize": settings.blocksize,
        "dtype": DTYPE_NAMES[dtype],
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
    storage_bytes = torch.empty((), dtype=settings.quant_storage).element_size()
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

    def __init__(self, source: PlannedTensor, settings: Quant4bitSettings, transposed: bool = False) -> None:
        self.source = source
        self.settings = settings
        self.transposed = transposed
        shape = source.shape[::-1] if transposed else source.shape
        self.layout = quantized_layout(source.name, shape, source.dtype, settings)
        self._shared = SharedProducer(self._quantize)

    def _quantize(self) -> dict[str, torch.Tensor]:
        import bitsandbytes.functional as bnb_functional

        weight = self.source.produce()  # merged, rounded once to the 16-bit output dtype, on the CPU
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

    def producer(self, part: str) -> Callable[[], torch.Tensor]:
        """The produce function of one part; the first part asked for runs the quantization."""
        return self._shared.part(part)


def requantize_plan(
    plan: SavePlan,
    settings_by_name: Mapping[str, Quant4bitSettings],
    transposed: Collection[str] = (),
) -> SavePlan:
    """The plan of a 4-bit save: every tensor named in ``settings_by_name`` becomes its 4-bit parts.

    Names in ``transposed`` are stored (in, out) (Conv1D) and quantized transposed, as transformers
    does. The other tensors (norms, embeddings, biases, lm_head, ...) stay as planned, in 16-bit.
    """
    tensors: list[PlannedTensor] = []
    for planned in plan.tensors:
        settings = settings_by_name.get(planned.name)
        if settings is None:
            tensors.append(planned)
            continue
        group = _QuantizedGroup(planned, settings, planned.name in transposed)
        for index, (name, shape, dtype) in enumerate(group.layout):
            tensors.append(
                PlannedTensor(
                    name, shape, dtype, group.producer(name), planned.lora_module if index == 0 else None
                )
            )
    return replace(plan, tensors=tensors)


def write_4bit_config(config: Any, directory: Path, dtype: torch.dtype, untied_embeddings: bool) -> None:
    """config.json of the 4-bit checkpoint: the quantization_config is kept, dtype set to the 16-bit dtype."""
    write_config(config, directory, dtype, untied_embeddings, keep_quantization=True)


def warn_accuracy_loss() -> None:
    """Say, loudly, that a re-quantized merge does not compute what the trained model computed."""
    logger.warning("fastsave: WARNING: %s", ACCURACY_WARNING)
    warnings.warn(ACCURACY_WARNING, UserWarning, stacklevel=3)


def save_merged_4bit_forced(
    model: nn.Module, tokenizer: Any, opts: SaveOptions, staging: Path
) -> dict[str, Any]:
    """Merge ``model`` in 16-bit, re-quantize its formerly 4-bit weights and write a 4-bit checkpoint.

    Returns the report ``save_pretrained_merged`` logs (the 4-bit plan, shard names, tokenizer files).

    Raises:
        ValueError: the model has no 4-bit weight, so there are no quantization settings to reuse.
    """
    from fastsave.save import build_merged_plan, write_merged_weights

    plan16 = build_merged_plan(model, opts)
    sources = weight_sources(model, plan16.lora_targets)
    settings = {
        name: settings_of(source.base_layer) for name, source in sources.items() if is_4bit(source.base_layer)
    }
    if not settings:
        raise ValueError(
            "save_method='merged_4bit_forced' re-quantizes the weights the model holds in 4-bit with the "
            "model's own settings, but this model has no bitsandbytes 4-bit layer: save 'merged_16bit' "
            "and load that with a BitsAndBytesConfig to get a 4-bit model"
        )
    root = unwrap_peft(model)
    if getattr(root.config, "quantization_config", None) is None:
        raise ValueError("the model's config has no quantization_config to write into the 4-bit checkpoint")
    warn_accuracy_loss()
    transposed = {name for name, source in sources.items() if stored_transposed(source.base_layer)}
    plan = to_checkpoint_names(root, requantize_plan(plan16, settings, transposed))
    shards = write_merged_weights(plan, staging, opts)
    write_4bit_config(root.config, staging, plan.dtype, plan.untied_embeddings)
    write_generation_config(root, staging)
    tokenizer_files = write_tokenizer(tokenizer, staging)
    logger.info(
        "fastsave: re-quantized %d weights to 4-bit (%s)",
        len(settings),
        ", ".join(
            sorted(
                {
                    f"{s.quant_type}, blocksize {s.blocksize}, double quant {s.double_quant}"
                    for s in settings.values()
                }
            )
        ),
    )
    return {"plan": plan, "shards": shards, "tokenizer_files": tokenizer_files}
