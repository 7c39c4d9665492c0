"""A saved peft adapter plus its 16-bit base checkpoint on disk (what ``fastsave merge`` saves).

No 4-bit model is loaded and no base weight is held beyond the tensor in flight. The base model is
built on the meta device from its config, peft wraps it for the adapter
(fastsave.adapters.saved_file), and the one plan walk runs over that model as over a live one;
this input answers where each meta tensor's values are: the checkpoint tensor of the same name, of
a tied alias, or of the name transformers renamed it from; or several pieces for a tensor it fuses
while loading (copied as stored).

With ``base_weights="dequantized"`` (the default) every weight a ``load_in_4bit`` load quantizes
is reproduced as training saw it: cast to the output dtype (the dtype the model was loaded in),
quantized with the training settings (QLoRA defaults: NF4, double quantization, blocksize 64) and
dequantized in float32 (fastsave.sources.nf4_roundtrip). With ``"original"`` the 16-bit tensors
are used as they are.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsave.adapters.saved_file import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAMES,
    SavedAdapter,
    attach_saved_adapter,
)
from fastsave.errors import PlanError
from fastsave.io.checkpoint_files import write_config
from fastsave.io.ownership import TOKENIZER_FILES
from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.plan.checks import check_plan
from fastsave.plan.dtype import output_dtype
from fastsave.plan.items import Plan
from fastsave.plan.layout import stored_as
from fastsave.plan.walk import unwrap_peft, walk_model
from fastsave.sources import ModuleTensor
from fastsave.sources.nf4_roundtrip import Nf4RoundTripSource, quantized_module_names
from fastsave.sources.safetensors_file import (
    SafetensorsCheckpoint,
    StoredPiecesSource,
    check_not_quantized_checkpoint,
    resolve_checkpoint_dir,
)
from fastsave.sources.settings_4bit import Quant4bitSettings

_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def meta_model(config: Any, task_type: str | None) -> nn.Module:
    """The model class the adapter was trained on, built on the meta device (no memory, no weights)."""
    import transformers

    class_name = _TASK_CLASSES.get(str(task_type).rsplit(".", 1)[-1]) if task_type else None
    if class_name is None:
        architectures = getattr(config, "architectures", None) or []
        class_name = (
            architectures[0] if architectures and hasattr(transformers, architectures[0]) else "AutoModel"
        )
    model_class = getattr(transformers, class_name)
    with torch.device("meta"):
        if class_name.startswith("AutoModel"):
            return model_class.from_config(config)
        return model_class(config)


class CheckpointResolver:
    """Meta tensors read from the base checkpoint (NF4 round trip for the weights training quantized)."""

    def __init__(
        self,
        root: nn.Module,
        checkpoint: SafetensorsCheckpoint,
        aliases: dict[int, list[str]],
        quantized: set[str],
        quant: Quant4bitSettings,
        round_trip: bool,
        dtype: torch.dtype,
    ) -> None:
        self.root = root
        self.checkpoint = checkpoint
        self.aliases = aliases
        self.quantized = quantized
        self.quant = quant
        self.round_trip = round_trip
        self.dtype = dtype
        self.problems: list[str] = []

    def resolve(self, name: str, module: nn.Module, entry: ModuleTensor, merged: bool) -> ModuleTensor | None:
        """The checkpoint tensor that holds ``name``; None for a buffer the checkpoint does not hold."""
        if entry.source is not None:  # the adapter's own tensors and trained copies
            return entry
        shape, dtype = tuple(entry.tensor.shape), entry.tensor.dtype
        candidates = [name] + [n for n in self.aliases.get(id(entry.tensor), []) if n != name]
        disk = next((n for n in candidates if n in self.checkpoint), None)
        if disk is None:
            stored = stored_as(self.root, name, shape, dtype)
            if len(stored) == 1 and next(iter(stored)) in self.checkpoint:
                disk = next(iter(stored))  # transformers renames it while loading
            elif len(stored) > 1 and all(piece in self.checkpoint for piece in stored):
                for piece, piece_shape in stored.items():
                    if self.checkpoint.shape(piece) != piece_shape:
                        self.problems.append(f"{piece} {self.checkpoint.shape(piece)} != {piece_shape}")
                return replace(entry, source=StoredPiecesSource(self.checkpoint, shape, stored))
            elif isinstance(entry.tensor, nn.Parameter):
                self.problems.append(f"{name} (not in the checkpoint)")
                return None
            else:
                return None  # a buffer the checkpoint does not hold is re-created by the model on load
        if self.checkpoint.shape(disk) != shape:
            self.problems.append(f"{name} {self.checkpoint.shape(disk)} != {shape}")
            return None
        source = self.checkpoint.source(disk)
        if entry.attr == "weight" and name.rsplit(".", 1)[0] in self.quantized:
            from transformers.pytorch_utils import Conv1D

            conv1d = isinstance(module, Conv1D)
            if self.round_trip:
                source = Nf4RoundTripSource(source, self.quant, self.dtype, conv1d)
            else:  # the 16-bit values as they are; a forced 4-bit save re-quantizes them the same way
                source.quant_settings, source.quantized_as_transpose = self.quant, conv1d
        return replace(entry, source=source)


def _copy_files(names: Any, source: Path, directory: Path) -> list[str]:
    copied = []
    for name in names:
        path = source / name
        if path.is_file() and not (directory / name).exists():
            shutil.copy2(path, directory / name)
            copied.append(name)
    return copied


def copy_tokenizer_files(adapter_dir: Path, base_dir: Path | None, directory: Path) -> list[str]:
    """Tokenizer files from the adapter directory when it has a tokenizer, else from the base.

    tokenizer.model comes from the base when the adapter's tokenizer lacks it (GGUF converters look for it).
    """
    has_tokenizer = any((adapter_dir / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json"))
    source = adapter_dir if has_tokenizer or base_dir is None else base_dir
    copied = _copy_files(TOKENIZER_FILES, source, directory)
    if base_dir is not None and source != base_dir:
        copied += _copy_files(("tokenizer.model",), base_dir, directory)
    return sorted(copied)


class SavedAdapterInput:
    """An adapter directory and a 16-bit base on disk, planned without loading a model."""

    def __init__(
        self,
        adapter_dir: str | Path,
        base: str | Path | None,
        quant: Quant4bitSettings | None = None,
    ) -> None:
        self.adapter = SavedAdapter.load(adapter_dir)
        self.team: SaveTeam | None = None  # one process; fastsave merge under torchrun: every rank
        self.quant = quant or Quant4bitSettings()
        self.base = base
        self.base_dir: Path | None = None
        self.root: nn.Module | None = None
        self.model: nn.Module | None = None  # the peft model on the meta device, once planned
        self._how = ""

    def resolve_base(self) -> tuple[Path, SafetensorsCheckpoint, Any]:
        """The base's directory, its checkpoint and its config, found locally (never downloaded).

        Raises:
            PlanError: not found, quantized, or without config.json.
        """
        from transformers import AutoConfig

        candidates = [self.base] if self.base else [self.adapter.base_name]
        base_dir, tried = resolve_checkpoint_dir(candidates, None if self.base else self.adapter.revision)
        if base_dir is None:
            raise PlanError(
                "the 16-bit base model was not found locally "
                f"(tried: {'; '.join(tried) or 'nothing: adapter_config.json names no base_model_name_or_path'}); "
                "pass --base /path/to/base (a directory with config.json and safetensors), or download it "
                "first: fastsave never downloads"
            )
        check_not_quantized_checkpoint(base_dir, "the base", ", with --base /path/to/base")
        if not (base_dir / "config.json").is_file():
            raise PlanError(f"the base {str(base_dir)!r} has no config.json")
        checkpoint = SafetensorsCheckpoint(base_dir)
        return base_dir, checkpoint, AutoConfig.from_pretrained(str(base_dir), local_files_only=True)

    def merged_plan(self, opts: SaveOptions) -> Plan:
        """The checked merged plan (see the module docstring).

        Raises:
            PlanError: no base found, an adapter that does not fit it, a checkpoint that does not
                match its config, an adapter feature fastsave cannot merge exactly.
        """
        self.base_dir, checkpoint, config = self.resolve_base()
        self.config = config
        base = meta_model(config, getattr(self.adapter.config, "task_type", None))
        aliases: dict[int, list[str]] = {}
        for name, tensor in [
            *base.named_parameters(remove_duplicate=False),
            *base.named_buffers(remove_duplicate=False),
        ]:
            aliases.setdefault(id(tensor), []).append(name)
        dequantize = opts.base_weights == "dequantized"
        quantized = quantized_module_names(base)
        dtype = output_dtype(base, opts.dtype)
        model = attach_saved_adapter(
            base, self.adapter, base_tensor=lambda n: checkpoint.get(n) if n in checkpoint else None
        )
        self.model, self.root = model, unwrap_peft(model)
        resolver = CheckpointResolver(
            self.root, checkpoint, aliases, quantized, self.quant, dequantize, dtype
        )
        plan = walk_model(self.root, resolver, dtype, None, self.adapter.lora_modules())
        if resolver.problems:
            problems = resolver.problems
            raise PlanError(
                "the base checkpoint does not match its config's model: "
                + "; ".join(problems[:6])
                + (" ..." if len(problems) > 6 else "")
                + ". If transformers renames this model's checkpoint keys on load, merge in a training session instead"
            )
        check_plan(plan)
        if dequantize:
            q = self.quant
            self._how = (
                f"the base {self.base_dir} as training saw it: each of the {len(quantized)} weights a 4-bit load "
                f"quantizes was quantized to {q.quant_type} (blocksize {q.blocksize}, double quant "
                f"{'on' if q.double_quant else 'off'}) and dequantized"
            )
        else:
            self._how = f"the original 16-bit base {self.base_dir} (base_weights='original')"
        return plan

    def quantization_config(self, plan: Plan) -> Any:
        """A BitsAndBytesConfig with the training settings, for a merged_4bit_forced checkpoint."""
        from transformers import BitsAndBytesConfig

        q = self.quant
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=plan.dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )

    def write_files(self, directory: Path, plan: Plan, opts: SaveOptions, quantization: Any) -> list[str]:
        """config.json from the base's, generation_config.json and tokenizer files copied from adapter or base."""
        write_config(self.config, directory, plan.dtype, plan.untied_embeddings, quantization)
        _copy_files(("generation_config.json",), self.adapter.directory, directory)
        _copy_files(("generation_config.json",), self.base_dir, directory)
        return copy_tokenizer_files(self.adapter.directory, self.base_dir, directory)

    def write_adapter(self, directory: Path, opts: SaveOptions) -> list[str]:
        """The adapter files as they are, plus the adapter's tokenizer files."""
        files = _copy_files((ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHTS_NAMES), self.adapter.directory, directory)
        return sorted(files + copy_tokenizer_files(self.adapter.directory, None, directory))

    def describe(self, plan: Plan) -> str:
        """What the adapter was merged into."""
        return self._how
