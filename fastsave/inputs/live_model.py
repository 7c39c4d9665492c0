"""A trained model in memory: a peft model (or a transformers model with a LoRA adapter loaded).

Its base weights are read as the model holds them (``base_weights="dequantized"``: bitsandbytes,
HQQ or torchao dequantized in float32, plain tensors as they are, accelerate-offloaded ones from
its weights map), or, with ``base_weights="original"``, every quantized or LoRA-merged weight is
read from the original 16-bit checkpoint on disk (a local path or the local HF cache, never
downloaded) and the adapters the model had already merged are added again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.adapters.live_peft import adapter_names_of, lora_module_census
from fastsave.errors import PlanError
from fastsave.io.checkpoint_files import write_config, write_generation_config, write_tokenizer
from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.plan.checks import check_plan
from fastsave.plan.dtype import output_dtype
from fastsave.plan.items import Plan
from fastsave.plan.walk import unwrap_peft, walk_model
from fastsave.sources import ModuleTensor
from fastsave.sources.dense import DenseSource
from fastsave.sources.offloaded import OffloadedSource
from fastsave.sources.safetensors_file import (
    SafetensorsCheckpoint,
    check_not_quantized_checkpoint,
    resolve_checkpoint_dir,
)
from fastsave.sources.transposed import TransposedSource

logger = logging.getLogger(__name__)


class InMemoryResolver:
    """Sources as the model holds them; a meta tensor is read from accelerate's offload map."""

    def resolve(self, name: str, module: nn.Module, entry: ModuleTensor, merged: bool) -> ModuleTensor:
        """``entry`` as found, or with an offloaded source for a meta tensor.

        Raises:
            PlanError: a meta tensor that nothing holds the values of.
        """
        if entry.source is not None:
            return entry
        try:
            return entry.with_source(OffloadedSource(module, entry.attr, entry.tensor))
        except LookupError:
            raise PlanError(
                f"{name} is on the meta device and no accelerate offload map holds its values, so it cannot "
                "be read: load the model fully (or with accelerate offloading), or save the adapter with "
                "save_method='lora' and merge it with `fastsave merge ADAPTER_DIR OUT_DIR`. Nothing was written."
            ) from None


class OriginalBaseResolver(InMemoryResolver):
    """Quantized and LoRA-merged weights read from the original 16-bit checkpoint; the rest as held."""

    def __init__(self, checkpoint: SafetensorsCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.problems: list[str] = []
        self.swapped = 0

    def resolve(self, name: str, module: nn.Module, entry: ModuleTensor, merged: bool) -> ModuleTensor:
        """The checkpoint's tensor for a quantized or merged weight; others as the model holds them."""
        entry = super().resolve(name, module, entry, merged)
        if isinstance(entry.source, DenseSource) and not merged:
            return entry
        if name not in self.checkpoint:
            self.problems.append(f"missing {name}")
            return entry
        disk = self.checkpoint.source(name)
        source = TransposedSource(disk) if entry.transposed else disk
        if source.shape != entry.source.shape:
            self.problems.append(f"{name} {self.checkpoint.shape(name)} (the model's {entry.source.shape})")
            return entry
        source.quant_settings = (
            entry.source.quant_settings
        )  # a forced 4-bit save re-quantizes it the same way
        self.swapped += 1
        return replace(entry, source=source, without_merged_adapters=True)


def _original_checkpoint(model: nn.Module, opts: SaveOptions) -> SafetensorsCheckpoint:
    config = getattr(unwrap_peft(model), "config", None)
    names = [getattr(config, "_name_or_path", None), getattr(config, "name_or_path", None)]
    candidates = (
        [opts.original_base_path] if opts.original_base_path else [n for n in dict.fromkeys(names) if n]
    )
    directory, tried = resolve_checkpoint_dir(candidates)
    if directory is None:
        raise PlanError(
            "base_weights='original' needs the model's original 16-bit checkpoint, which was not found "
            f"locally (tried: {'; '.join(tried) or 'no name: the model config has no _name_or_path'}). "
            "fastsave never downloads it behind your back: pass original_base_path='/path/to/base' "
            "(a directory with the safetensors files), or download the base first, or save with "
            "base_weights='dequantized'"
        )
    check_not_quantized_checkpoint(
        directory, "the original base checkpoint", ", with original_base_path='/path/to/base'"
    )
    return SafetensorsCheckpoint(directory)


class LiveModelInput:
    """A peft / transformers model in memory, to be saved merged or as an adapter."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.team: SaveTeam | None = None  # one process
        self.root = unwrap_peft(model)
        self.tokenizer = tokenizer
        self._original: OriginalBaseResolver | None = None

    def merged_plan(self, opts: SaveOptions) -> Plan:
        """The checked merged plan of the model (see fastsave.plan.walk).

        Raises:
            PlanError: nothing to merge, an adapter name that does not exist, an adapter or a weight
                fastsave cannot merge exactly, or (original base) a checkpoint that does not match.
        """
        tied: set[int] = set()
        census = self.census(opts, tied)
        resolver: InMemoryResolver = InMemoryResolver()
        if opts.base_weights == "original":
            self._original = resolver = OriginalBaseResolver(_original_checkpoint(self.model, opts))
        plan = walk_model(
            self.root, resolver, output_dtype(self.root, opts.dtype), opts.adapter_names, census, tied=tied
        )
        if self._original is not None and self._original.problems:
            problems = self._original.problems
            raise PlanError(
                f"the checkpoint at {str(self._original.checkpoint.directory)!r} does not match this model: "
                f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}; pass the checkpoint the model "
                "was loaded from as original_base_path"
            )
        check_plan(plan)
        if self._original is not None:
            logger.info(
                "fastsave: base_weights='original': %d weights (%d with LoRA merged) read from the 16-bit "
                "checkpoint %s",
                self._original.swapped,
                len(plan.merged_modules),
                self._original.checkpoint.directory,
            )
        return plan

    def census(self, opts: SaveOptions, tied: set[int] | None = None) -> list[str]:
        """The LoRA modules of the selected adapters, counted independently of the plan walk
        (``tied``: see fastsave.adapters.live_peft.lora_module_census).

        Raises:
            UnsupportedAdapterError: an adapter fastsave cannot merge. PlanError: an adapter name
                that does not exist. A model with no adapter at all is saved as it is (a warning says so).
        """
        census = lora_module_census(self.root, opts.adapter_names, tied)  # refuses non-LoRA adapters too
        if opts.adapter_names is not None:
            present = _adapter_names_in(self.root)
            missing = [a for a in opts.adapter_names if a not in present]
            if missing:
                raise PlanError(
                    f"adapter(s) {missing} not found in the model's LoRA layers; check adapter_names"
                )
        if not census:
            # a full fine-tune or a plain (4-bit) model: saved in the requested form, as Unsloth does
            logger.warning(
                "fastsave: no adapter found: saving the model's own weights (%s)",
                "dequantized" if _holds_quantized_weights(self.root) else "as they are",
            )
        return census

    def quantization_config(self, plan: Plan) -> Any:
        """The model's own quantization_config (a 4-bit save keeps the settings it was trained with).

        Raises:
            PlanError: the model has no 4-bit weight or no quantization_config to reuse.
        """
        if not any(item.requantize is not None for item in plan.items):
            raise PlanError(
                "save_method='merged_4bit_forced' re-quantizes the weights the model holds in 4-bit with the "
                "model's own settings, but this model has no bitsandbytes 4-bit layer: save 'merged_16bit' "
                "and load that with a BitsAndBytesConfig to get a 4-bit model"
            )
        quantization = getattr(getattr(self.root, "config", None), "quantization_config", None)
        if quantization is None:
            raise PlanError(
                "the model's config has no quantization_config to write into the 4-bit checkpoint"
            )
        return quantization

    def write_files(self, directory: Path, plan: Plan, opts: SaveOptions, quantization: Any) -> list[str]:
        """config.json (dtype set, ties true to the weights), generation_config.json, tokenizer files."""
        write_config(self.root.config, directory, plan.dtype, plan.untied_embeddings, quantization)
        write_generation_config(self.root, directory)
        return write_tokenizer(self.tokenizer, directory)

    def write_adapter(self, directory: Path, opts: SaveOptions) -> list[str]:
        """The adapter exactly as peft's save_pretrained writes it, plus the tokenizer.

        Raises:
            PlanError: the model holds no peft adapter.
        """
        if not hasattr(self.model, "peft_config"):
            raise PlanError(
                "save_method='lora' needs a peft model (or a transformers model with an adapter loaded)"
            )
        kwargs: dict[str, Any] = {
            "safe_serialization": opts.safe_serialization,
            "save_embedding_layers": opts.save_embedding_layers,
        }
        if opts.adapter_names is not None:
            kwargs["selected_adapters"] = list(opts.adapter_names)
        if opts.state_dict is not None:  # peft takes the adapter's tensors from it
            kwargs["state_dict"] = opts.state_dict
        self.model.save_pretrained(str(directory), **kwargs)
        return write_tokenizer(self.tokenizer, directory)

    def describe(self, plan: Plan) -> str:
        """'the base weights the adapter was trained against (4-bit)' or the original checkpoint."""
        if self._original is not None:
            return f"the original 16-bit base checkpoint {self._original.checkpoint.directory}"
        kinds = " and ".join(plan.source_kinds()) or "none"
        return f"the base weights the adapter was trained against ({kinds})"


def _adapter_names_in(root: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in root.modules():
        names |= adapter_names_of(module)
    return names


def _holds_quantized_weights(root: nn.Module) -> bool:
    """Whether any parameter of the model is a quantized weight (bitsandbytes, HQQ, torchao...)."""
    return any(
        not param.is_floating_point() or type(param).__name__ in ("Params4bit", "Int8Params")
        for param in root.parameters()
    )
