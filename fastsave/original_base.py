"""base_weights="original": merge the adapter into the original 16-bit checkpoint on disk.

The normal plan (``fastsave.plan.build_plan``) is built first, so the output names, shapes, dtypes,
tied-embedding handling and modules_to_save copies are exactly those of a "dequantized" save. Then
every entry whose weight the model holds quantized (or wraps with LoRA) gets a new ``produce``:
read that one tensor from the original safetensors checkpoint (``safe_open``, one tensor at a
time), add every selected adapter's delta in float32 with fastsave.lora_merge's own arithmetic
(DoRA included), round once to the output dtype. Nothing else changes.

Where the checkpoint is found, in this order: ``original_base_path``; the model config's
``_name_or_path`` when it is a local directory; the same name in the local Hugging Face cache
(``local_files_only=True``: never downloaded). Not found is a ValueError before anything is written.

The same pieces serve the ``fastsave merge`` command line: :func:`resolve_checkpoint_dir`,
:class:`SafetensorsCheckpoint` and :class:`LoraArithmetic`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from fastsave.io.shards import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from fastsave.lora_merge import LoraTarget, is_lora_layer, merged_weight_float32
from fastsave.options import SaveOptions
from fastsave.plan import SavePlan, build_plan, check_plan, to_output_tensor, unwrap_peft
from fastsave.quantized import is_quantized, to_checkpoint_layout

logger = logging.getLogger("fastsave")

_FLOAT_DTYPES = {
    "F64",
    "F32",
    "F16",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "FLOAT64",
    "FLOAT32",
    "FLOAT16",
    "BFLOAT16",
}


# --------------------------------------------------------------------------- finding the checkpoint


def find_in_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, or None; never downloads."""
    if not repo_id or Path(repo_id).is_absolute() or repo_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as error:  # not cached, an invalid repo id, no cache folder: all mean "not here"
        logger.debug("fastsave: %r not found in the local Hugging Face cache (%s)", repo_id, error)
        return None
    return Path(path)


def resolve_checkpoint_dir(
    candidates: Iterable[str | Path | None], revision: str | None = None
) -> tuple[Path | None, list[str]]:
    """The first candidate that is a local directory or a repo id in the local HF cache (at ``revision``).

    Returns the directory (None when no candidate resolves) and what was tried, for the error message.
    """
    tried: list[str] = []
    for candidate in candidates:
        if candidate is None or str(candidate) == "":
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path, tried
        tried.append(f"{str(candidate)!r} (not a local directory)")
        cached = find_in_hf_cache(str(candidate), revision)
        if cached is not None:
            return cached, tried
        tried[-1] = f"{str(candidate)!r} (not a local directory, not in the local Hugging Face cache)"
    return None, tried


def _model_name_candidates(model: nn.Module) -> list[str]:
    config = getattr(unwrap_peft(model), "config", None)
    names = [getattr(config, "_name_or_path", None), getattr(config, "name_or_path", None)]
    return [n for n in dict.fromkeys(names) if n]


def check_not_quantized_checkpoint(directory: Path, what: str, hint: str = "") -> None:
    """Refuse a checkpoint whose config.json says it is already quantized (bnb-4bit repos and the like).

    Raises:
        ValueError: the checkpoint holds quantized weights, not the 16-bit base.
    """
    config_file = directory / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ValueError(
            f"{what} {str(directory)!r} is a {method} checkpoint, not the 16-bit base: point to the "
            f"original 16-bit model instead (the repo the quantized one was made from){hint}"
        )


# --------------------------------------------------------------------------- reading the checkpoint


class SafetensorsCheckpoint:
    """The tensors of a local safetensors checkpoint, read one at a time (never the whole state dict)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / WEIGHTS_INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(single, "pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), single)
        else:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (it holds {', '.join(bins)}: convert it to safetensors first)" if bins else ""
            raise ValueError(f"{str(self.directory)!r} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.file_of

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self.file_of)

    def _read_meta(self) -> None:
        for file in sorted(set(self.file_of.values())):
            with safe_open(file, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    tensor_slice = handle.get_slice(name)
                    self._meta[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of one tensor, read from the header (no data)."""
        if not self._meta:
            self._read_meta()
        return self._meta[name][0]

    def is_floating_point(self, name: str) -> bool:
        """Whether the stored tensor is of a floating-point dtype (from the header)."""
        if not self._meta:
            self._read_meta()
        return self._meta[name][1].upper() in _FLOAT_DTYPES

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file now (the file is opened and closed for this one read)."""
        with safe_open(self.file_of[name], "pt") as handle:
            return handle.get_tensor(name)


# --------------------------------------------------------------------------- LoRA arithmetic on another base


@functools.cache
def _arithmetic_class(kind: str) -> type:
    # fastsave.lora_merge decides some of peft's rules by the layer's class name ("Linear" applies
    # fan_in_fan_out, "Embedding" takes the embedding delta and DoRA norm), so the view carries the
    # class name of the layer it stands for.
    return type(kind, (LoraArithmetic,), {"__module__": __name__, "__qualname__": f"LoraArithmetic[{kind}]"})


class LoraArithmetic:
    """A stand-in for a peft LoRA layer, for fastsave.lora_merge's functions, with a base of our choosing.

    ``fastsave.lora_merge.merged_weight_float32`` and ``merged_bias_float32`` read the adapter
    tensors (lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector, scaling, lora_bias,
    lora_variant, fan_in_fan_out) and ``get_base_layer().weight/bias``. This object answers those
    from ``attributes`` (a real peft layer, or plain dicts built from a saved adapter file) except
    the base layer, which is ``base_weight`` / ``base_bias``: the original checkpoint's tensors.
    Create it with :meth:`for_kind` so it carries the layer class name lora_merge's rules key on.
    """

    def __init__(self, attributes: Any, base_weight: torch.Tensor, base_bias: torch.Tensor | None) -> None:
        self._attributes = attributes
        self._base = SimpleNamespace(weight=base_weight, bias=base_bias)

    @classmethod
    def for_kind(
        cls, kind: str, attributes: Any, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> LoraArithmetic:
        """A view whose class is named ``kind`` ("Linear", "Linear4bit", "Embedding", ...)."""
        return _arithmetic_class(kind)(attributes, base_weight, base_bias)

    def with_base(self, base_weight: torch.Tensor, base_bias: torch.Tensor | None) -> LoraArithmetic:
        """The same adapter over another base weight and bias."""
        return self.for_kind(type(self).__name__, self._attributes, base_weight, base_bias)

    def get_base_layer(self) -> SimpleNamespace:
        """The base layer lora_merge merges into: the given weight and bias."""
        return self._base

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("_attributes")
        if isinstance(attributes, Mapping):
            if name in attributes:
                return attributes[name]
            raise AttributeError(name)
        return getattr(attributes, name)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class WeightSource:
    """Where the model holds the weight of one output tensor."""

    base_layer: nn.Module  # the module whose .weight is saved (the LoRA layer's base layer)
    target: LoraTarget | None  # the LoRA target merged into it, if any


def weight_sources(model: nn.Module, targets: Iterable[LoraTarget]) -> dict[str, WeightSource]:
    """Output weight name -> (base layer, LoRA target) for every LoRA layer and quantized linear.

    The names are the ones ``build_plan`` gives (the LoRA layer's path + ".weight", no
    ".base_layer"); modules inside a LoRA layer are reached through it.
    """
    root = unwrap_peft(model)
    by_layer = {id(t.layer): t for t in targets}
    sources: dict[str, WeightSource] = {}
    inside: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        prefix = f"{name}." if name else ""
        if is_lora_layer(module):
            inside.append(prefix)
            sources[prefix + "weight"] = WeightSource(module.get_base_layer(), by_layer.get(id(module)))
        elif is_quantized(module):
            sources[prefix + "weight"] = WeightSource(module, None)
    return sources


def _original_producer(
    checkpoint: SafetensorsCheckpoint, name: str, source: WeightSource, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        target = source.target
        # to_checkpoint_layout is a transpose or nothing: applied to the stored weight it gives the
        # layout the layer computes (and the adapter merges) in; applied again, the stored layout.
        weight = to_checkpoint_layout(source.base_layer, checkpoint.get(name).to(torch.float32))
        if target is not None:
            layer = target.layer
            bias = getattr(source.base_layer, "bias", None)
            view = LoraArithmetic.for_kind(type(layer).__name__, layer, weight, bias)
            # The disk base holds none of the adapters the model had already merged: add them too.
            adapters = target.already_merged + target.adapters
            weight = merged_weight_float32(LoraTarget(target.name, view, adapters, ()))
        weight = to_checkpoint_layout(source.base_layer, weight)
        return to_output_tensor(weight, dtype, name)

    return produce


def build_original_plan(model: nn.Module, options: SaveOptions) -> SavePlan:
    """The merged plan of ``model`` with every quantized or LoRA-wrapped weight read from the 16-bit base.

    Raises:
        ValueError: the original checkpoint cannot be found locally, is itself quantized, or lacks
            a tensor (or has another shape) than the plan needs. Nothing has been written then.
    """
    candidates = [options.original_base_path] if options.original_base_path else _model_name_candidates(model)
    directory, tried = resolve_checkpoint_dir(candidates)
    if directory is None:
        raise ValueError(
            "base_weights='original' needs the model's original 16-bit checkpoint, which was not found "
            f"locally (tried: {'; '.join(tried) or 'no name: the model config has no _name_or_path'}). "
            "fastsave never downloads it behind your back: pass original_base_path='/path/to/base' "
            "(a directory with the safetensors files), or download the base first, or save with "
            "base_weights='dequantized'"
        )
    check_not_quantized_checkpoint(
        directory, "the original base checkpoint", ", with original_base_path='/path/to/base'"
    )
    checkpoint = SafetensorsCheckpoint(directory)

    plan = build_plan(model, options.dtype, options.adapter_names)
    sources = weight_sources(model, plan.lora_targets)
    missing: list[str] = []
    mismatched: list[str] = []
    tensors = []
    swapped = 0
    for planned in plan.tensors:
        source = sources.get(planned.name)
        if source is None or (source.target is None and not is_quantized(source.base_layer)):
            tensors.append(planned)
            continue
        if planned.name not in checkpoint:
            missing.append(planned.name)
        elif checkpoint.shape(planned.name) != planned.shape:
            mismatched.append(f"{planned.name} {checkpoint.shape(planned.name)} != {planned.shape}")
        tensors.append(
            replace(planned, produce=_original_producer(checkpoint, planned.name, source, plan.dtype))
        )
        swapped += 1
    if missing or mismatched:
        raise ValueError(
            f"the checkpoint at {str(directory)!r} does not match this model: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"other shapes: {mismatched[:5]}; " if mismatched else "")
            + "pass the checkpoint the model was loaded from as original_base_path"
        )
    original = replace(plan, tensors=tensors)
    check_plan(original)
    logger.info(
        "fastsave: base_weights='original': %d weights (%d with LoRA merged) read from the 16-bit checkpoint %s",
        swapped,
        len(plan.lora_targets),
        directory,
    )
    return original
