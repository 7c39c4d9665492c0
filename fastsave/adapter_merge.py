"""Merge a saved peft LoRA adapter into a 16-bit base on disk (what ``fastsave merge`` runs).

No 4-bit model is loaded and no model weight is held beyond the tensor in flight: the base
checkpoint's safetensors are read one tensor at a time, the adapter file (small) once.

What is merged into what (``--base-weights``):

* ``dequantized`` (default, DESIGN.md): the saved model computes what the trained 4-bit model
  computed. Training loaded the base with ``load_in_4bit``, which quantizes *every* weight that
  transformers' bitsandbytes integration converts (each ``nn.Linear`` / ``Conv1D`` except the
  output embedding, ``_keep_in_fp32_modules`` and ``llm_int8_skip_modules``), not only the LoRA
  targets. So each of those weights is cast to the dtype the model was loaded in (the output
  dtype: ``--dtype``, else the base's 16-bit dtype; transformers casts before it quantizes),
  quantized with ``bitsandbytes.functional.quantize_4bit`` (``--quant-type``, ``--blocksize``,
  double quantization unless ``--no-double-quant``: the QLoRA defaults nf4/64/on) and dequantized
  again in float32 as it streams past; LoRA deltas are added to that in float32 and the sum is
  rounded once. For an adapter trained on a 4-bit model loaded on the CPU with the same settings,
  the result equals ``save_pretrained_merged`` of that model bit for bit (bitsandbytes' CPU
  quantization is deterministic). Weights that a 4-bit load keeps in 16-bit (embeddings, norms,
  lm_head) are copied as they are.
* ``original``: the 16-bit tensors as they are, plus the deltas: higher precision, but not the
  model that was trained and evaluated.

The delta is peft's: scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; rank_pattern
and alpha_pattern honoured), fan_in_fan_out, DoRA magnitude, lora_bias, LoRA on embeddings;
computed by fastsave.lora_merge on a stand-in layer (fastsave.original_base.LoraArithmetic).
modules_to_save tensors in the adapter replace the base's. The tensors are listed in the order
the in-memory plan lists them (the model's module order), then streamed by
``fastsave.save.write_merged_weights`` into a staging directory and published in one step.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fastsave.checkpoint_names import stored_as
from fastsave.forced_4bit import Quant4bitSettings, requantize_plan, warn_accuracy_loss, write_4bit_config
from fastsave.io.checkpoint_files import write_config
from fastsave.io.publish import publish
from fastsave.lora_merge import (
    LoraTarget,
    UnsupportedAdapterError,
    merged_bias_float32,
    merged_weight_float32,
)
from fastsave.memory import peak_rss
from fastsave.options import SaveOptions, parse_options
from fastsave.original_base import (
    LoraArithmetic,
    SafetensorsCheckpoint,
    check_not_quantized_checkpoint,
    resolve_checkpoint_dir,
)
from fastsave.plan import (
    PlannedTensor,
    SavePlan,
    TiedWeights,
    check_plan,
    sixteen_bit_dtype,
    to_output_tensor,
)

logger = logging.getLogger("fastsave")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<ab>lora_A|lora_B)\.(?P<param>weight|bias)"
    r"|(?P<raw>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?)$"
)
# peft features whose merge is not plain LoRA/DoRA arithmetic, or that change the base weights.
_REFUSED_FIELDS = (
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "megatron_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class MergeError(ValueError):
    """The merge cannot run as asked; nothing has been written."""


# --------------------------------------------------------------------------- the command line


@dataclass
class _ModuleAdapter:
    """The LoRA tensors of one module in a saved adapter."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # lora_A, lora_B, lora_B.bias, ...

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.tensors

    @property
    def rank(self) -> int:
        key = "lora_embedding_A" if self.is_embedding else "lora_A"
        return self.tensors[key].shape[0]


@dataclass
class SavedAdapter:
    """A peft LoRA adapter as saved on disk: its config and tensors, grouped by module."""

    directory: Path
    config: Any  # peft.LoraConfig
    modules: dict[str, _ModuleAdapter]
    replacements: dict[str, torch.Tensor]  # modules_to_save: base parameter name -> trained tensor
    # copies of LoRA-wrapped base weights (peft's save_embedding_layers): parameter name -> tensor
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path) -> SavedAdapter:
        """Read and check an adapter directory.

        Raises:
            MergeError: no such directory, no adapter files, not a LoRA adapter, or a LoRA feature
                fastsave cannot merge exactly.
        """
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise MergeError(f"adapter directory {str(directory)!r} does not exist")
        if not (directory / ADAPTER_CONFIG_NAME).is_file():
            raise MergeError(
                f"{str(directory)!r} has no {ADAPTER_CONFIG_NAME}: give the directory peft's "
                "save_pretrained wrote (a non-default adapter is in a sub-folder named after it)"
            )
        weights = next((directory / n for n in ADAPTER_WEIGHTS_NAMES if (directory / n).is_file()), None)
        if weights is None:
            raise MergeError(f"{str(directory)!r} has no {' or '.join(ADAPTER_WEIGHTS_NAMES)}")
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(directory))
        peft_type = getattr(config, "peft_type", None)
        peft_type = str(getattr(peft_type, "value", peft_type) or "")
        if peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"the adapter in {str(directory)!r} is {peft_type or 'not a peft adapter'}; fastsave merges LoRA"
            )
        for name in _REFUSED_FIELDS:
            if getattr(config, name, None):
                where = (
                    "; merge it in the training session with save_pretrained_merged, which does"
                    if name == "target_parameters"
                    else ""
                )
                raise UnsupportedAdapterError(
                    f"the adapter uses peft's {name}, which the command line does not merge{where}"
                )
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise UnsupportedAdapterError(
                f"the adapter was initialised with init_lora_weights={init!r}, which changes the base "
                "weights: merge it in the training session, or save it converted to plain LoRA "
                "(peft's path_initial_model_for_weight_conversion)"
            )
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        modules: dict[str, _ModuleAdapter] = {}
        replacements: dict[str, torch.Tensor] = {}
        base_copies: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            name = key.removeprefix(_PEFT_PREFIX)
            match = _LORA_KEY.match(name)
            if ".base_layer." in name:
                base_copies[name.replace(".base_layer.", ".")] = tensor
                continue
            if match:
                part = match["raw"] or (match["ab"] if match["param"] == "weight" else f"{match['ab']}.bias")
                modules.setdefault(match["module"], _ModuleAdapter()).tensors[part] = tensor
            elif "lora_" in name or "token_adapter" in name:
                raise UnsupportedAdapterError(f"adapter tensor {key!r} is of a kind fastsave cannot merge")
            else:
                replacements[name] = tensor
        for module, adapter in modules.items():
            needed = (
                ("lora_embedding_A", "lora_embedding_B") if adapter.is_embedding else ("lora_A", "lora_B")
            )
            if any(n not in adapter.tensors for n in needed):
                raise MergeError(f"adapter module {module!r} lacks {needed}: the adapter file is incomplete")
        if not modules:
            raise MergeError(f"the adapter in {str(directory)!r} holds no LoRA tensor: nothing to merge")
        return cls(directory, config, modules, replacements, base_copies)

    @property
    def base_name(self) -> str | None:
        """The base model the adapter was trained on, as recorded in adapter_config.json."""
        return getattr(self.config, "base_model_name_or_path", None)

    def scaling(self, module: str, rank: int) -> float:
        """peft's scaling for one module: alpha / r, or alpha / sqrt(r) with rslora; patterns honoured."""
        from peft.utils.other import get_pattern_key

        rank_pattern = getattr(self.config, "rank_pattern", None) or {}
        alpha_pattern = getattr(self.config, "alpha_pattern", None) or {}
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), self.config.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), self.config.lora_alpha)
        if r != rank:
            raise MergeError(
                f"adapter module {module!r} has rank {rank} but its config says r={r}: the config and "
                "the weights do not belong together"
            )
        if getattr(self.config, "use_rslora", False):
            return alpha / math.sqrt(r)
        return alpha / r

    def arithmetic_attributes(self, module: str, conv1d: bool) -> dict[str, Any]:
        """What fastsave.lora_merge reads from a peft layer, built from this adapter's tensors."""
        from peft.tuners.lora.variants import DoraEmbeddingVariant, DoraLinearVariant

        adapter = self.modules[module]
        t = adapter.tensors
        attributes: dict[str, Any] = {
            "scaling": {ADAPTER: self.scaling(module, adapter.rank)},
            "lora_bias": {ADAPTER: "lora_B.bias" in t},
            # peft stores Conv1D weights (in, out): the delta is transposed to that layout
            "fan_in_fan_out": bool(getattr(self.config, "fan_in_fan_out", False)) or conv1d,
        }
        if adapter.is_embedding:
            attributes["lora_embedding_A"] = {ADAPTER: t["lora_embedding_A"]}
            attributes["lora_embedding_B"] = {ADAPTER: t["lora_embedding_B"]}
        else:
            attributes["lora_A"] = {ADAPTER: SimpleNamespace(weight=t["lora_A"])}
            attributes["lora_B"] = {ADAPTER: SimpleNamespace(weight=t["lora_B"], bias=t.get("lora_B.bias"))}
        if "lora_magnitude_vector" in t:
            variant = DoraEmbeddingVariant() if adapter.is_embedding else DoraLinearVariant()
            attributes["lora_variant"] = {ADAPTER: variant}
            attributes["lora_magnitude_vector"] = {
                ADAPTER: SimpleNamespace(weight=t["lora_magnitude_vector"])
            }
        return attributes


# --------------------------------------------------------------------------- the base model's structure


def _meta_model(config: Any, task_type: str | None) -> nn.Module:
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


def quantized_module_names(model: nn.Module, skip_modules: list[str] | None = None) -> set[str]:
    """The modules a ``load_in_4bit`` load of ``model`` turns into bitsandbytes Linear4bit layers.

    Uses transformers' own rule (nn.Linear and Conv1D, minus get_modules_to_not_convert: the
    output embedding, tied modules, _keep_in_fp32_modules, llm_int8_skip_modules).
    """
    from transformers import BitsAndBytesConfig

    try:
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        quantizer = Bnb4BitHfQuantizer(
            BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip_modules)
        )
        not_convert = quantizer.get_modules_to_not_convert(
            model, skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - older transformers
        Conv1D = ()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        not_convert = [n for n, m in model.named_modules() if m is output] + list(skip_modules or [])

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)

    return {
        name
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or (Conv1D and isinstance(module, Conv1D)))
        and should_convert_module(name, not_convert)
    }


def _quant_dequant_float32(
    weight: torch.Tensor, settings: Quant4bitSettings, dtype: torch.dtype, conv1d: bool
) -> torch.Tensor:
    """What a 4-bit load makes of ``weight``: cast to ``dtype``, quantize, dequantize in float32."""
    import bitsandbytes.functional as bnb_functional

    source = weight.to(dtype)
    if conv1d:  # transformers quantizes Conv1D weights transposed, in the Linear (out, in) layout
        source = source.T.contiguous()
    codes, state = bnb_functional.quantize_4bit(
        source,
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=torch.uint8,
    )
    state.dtype = torch.float32  # as fastsave.quantized: code * absmax in float32, no rounding
    out = bnb_functional.dequantize_4bit(codes, state)
    return out.T.contiguous() if conv1d else out


def build_adapter_plan(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    adapter: SavedAdapter,
    dtype: torch.dtype,
    quant: Quant4bitSettings | None,
    quantized: set[str],
) -> SavePlan:
    """Every output tensor of the merged checkpoint, in the order the in-memory plan lists them.

    ``model`` is the base model on the meta device (structure only); ``quant`` is None for
    base_weights="original", else the settings each module in ``quantized`` is quantized with.
    Tied parameters follow fastsave.plan: written once while both sides stay equal, both (and
    ``untied_embeddings``) when the adapter changes one.

    Raises:
        MergeError: an adapter module or modules_to_save tensor the base does not have (or of
            another shape), or a base tensor missing from the checkpoint.
    """
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    for name, module_adapter in adapter.modules.items():
        if name not in modules:
            raise MergeError(f"the adapter has LoRA weights for {name!r}, which the base model does not have")
        if module_adapter.is_embedding != isinstance(modules[name], nn.Embedding):
            raise MergeError(
                f"adapter module {name!r} does not match the base's {type(modules[name]).__name__}"
            )
    names_of: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
        shapes[name] = tuple(param.shape)
    for name, tensor in adapter.replacements.items():
        if name not in shapes:
            raise MergeError(f"the adapter holds {name!r}, which is not a parameter of the base model")
        if tuple(tensor.shape) != shapes[name]:
            raise MergeError(
                f"the adapter's {name} has shape {tuple(tensor.shape)}, the base's {shapes[name]}: a resized "
                "vocabulary is not supported by the command line; merge in the training session"
            )

    for name, copy in adapter.base_copies.items():
        # peft saves the base embedding beside an embedding LoRA; merging into the checkpoint's is
        # right only while the two are the same tensor (no resized or retrained vocabulary)
        if name not in checkpoint or not torch.equal(
            copy.to(checkpoint.get(name).dtype), checkpoint.get(name)
        ):
            raise MergeError(
                f"the adapter holds its own base weight for {name} that differs from the base checkpoint's "
                "(a resized or retrained vocabulary): not supported by the command line; merge in the "
                "training session"
            )

    tensors: list[PlannedTensor] = []
    targets: list[LoraTarget] = []
    ties = TiedWeights()
    problems: list[str] = []

    def on_disk(name: str, param: torch.Tensor) -> str:
        """The checkpoint tensor holding ``name``: itself, one it is tied to, or its renamed self."""
        candidates = [name] + [n for n in names_of.get(id(param), []) if n != name]
        disk = next((n for n in candidates if n in checkpoint), None)
        if disk is None:
            stored = stored_as(model, name, param)
            if len(stored) == 1 and next(iter(stored)) in checkpoint:
                disk = next(iter(stored))  # transformers renames it while loading
            else:
                problems.append(f"{name} (not in the checkpoint)")
                return name
        if checkpoint.shape(disk) != tuple(param.shape):
            problems.append(f"{name} {checkpoint.shape(disk)} != {tuple(param.shape)}")
        return disk

    def add(name: str, param: torch.Tensor, produce, modified: bool, out: torch.dtype, lora=None) -> None:
        if ties.should_write(name, param, modified):
            tensors.append(PlannedTensor(name, tuple(param.shape), out, produce, lora))

    def split_on_disk(name: str, param: torch.Tensor) -> dict[str, tuple[int, ...]] | None:
        """The checkpoint tensors a fused tensor of the model (MoE experts) was loaded from, if so."""
        if any(n in checkpoint for n in [name, *names_of.get(id(param), [])]):
            return None
        stored = stored_as(model, name, param)
        if len(stored) < 2 or any(piece not in checkpoint for piece in stored):
            return None
        return stored

    def out_dtype(disk: str) -> torch.dtype:
        # floating tensors become the output dtype; integer ones keep theirs (as fastsave.plan does)
        if disk not in checkpoint or checkpoint.is_floating_point(disk):
            return dtype
        return checkpoint.get(disk).dtype

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        conv1d = isinstance(module, Conv1D)
        lora = adapter.modules.get(module_name)
        quantize = quant if module_name in quantized else None
        for attr, param in module.named_parameters(recurse=False):
            name = prefix + attr
            if name in adapter.replacements:  # modules_to_save: the trained copy replaces the base's
                replacement = adapter.replacements[name]
                out = dtype if replacement.is_floating_point() else replacement.dtype
                add(name, param, _tensor_producer(replacement, dtype, name), True, out)
                continue
            pieces = split_on_disk(name, param)
            if pieces is not None:
                # fused while loading (MoE experts): copied piece by piece under the checkpoint's own
                # names, as the in-memory save writes them; merging LoRA into one is not supported
                if lora is not None or (quantize is not None and attr == "weight"):
                    problems.append(
                        f"{name} (fused from {len(pieces)} checkpoint tensors; cannot merge into it)"
                    )
                    continue
                for piece, shape in pieces.items():
                    if checkpoint.shape(piece) != shape:
                        problems.append(f"{piece} {checkpoint.shape(piece)} != {shape}")
                    produce = _plain_producer(checkpoint, piece, None, dtype, False, piece)
                    tensors.append(PlannedTensor(piece, shape, out_dtype(piece), produce))
                continue
            disk = on_disk(name, param)
            if disk != name and disk not in names_of.get(id(param), []):
                name = disk  # renamed while loading: written under the checkpoint's own name
            if lora is not None and attr == "weight":
                target = LoraTarget(
                    module_name, _arithmetic_view(adapter, module_name, module, conv1d), (ADAPTER,), ()
                )
                targets.append(target)
                bias = getattr(module, "bias", None)
                bias_disk = on_disk(prefix + "bias", bias) if bias is not None else None
                produce = _merged_producer(checkpoint, disk, bias_disk, target, quantize, dtype, conv1d, name)
                add(name, param, produce, True, dtype, lora=module_name)
            elif lora is not None and attr == "bias":
                target = LoraTarget(
                    module_name, _arithmetic_view(adapter, module_name, module, conv1d), (ADAPTER,), ()
                )
                produce = _merged_bias_producer(checkpoint, disk, target, dtype, name)
                add(name, param, produce, "lora_B.bias" in lora.tensors, out_dtype(disk))
            else:
                quantize_this = quantize if attr == "weight" else None
                produce = _plain_producer(checkpoint, disk, quantize_this, dtype, conv1d, name)
                add(name, param, produce, False, out_dtype(disk))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for attr, buffer in module.named_buffers(recurse=False):
            name = prefix + attr
            if attr in non_persistent or buffer is None or name not in checkpoint:
                continue  # a buffer the checkpoint does not hold is re-created by the model on load
            add(
                name,
                buffer,
                _plain_producer(checkpoint, name, None, dtype, False, name),
                False,
                out_dtype(name),
            )

    if problems:
        raise MergeError(
            "the base checkpoint does not match its config's model: "
            + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "")
            + ". If transformers renames this model's checkpoint keys on load, merge in a training session instead"
        )
    plan = SavePlan(tensors, dtype, targets, ties.untied, ties.written_once)
    check_plan(plan)
    return plan


def _arithmetic_view(
    adapter: SavedAdapter, module_name: str, module: nn.Module, conv1d: bool
) -> LoraArithmetic:
    kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
    attributes = adapter.arithmetic_attributes(module_name, conv1d)
    return LoraArithmetic.for_kind(kind, attributes, torch.empty(0), None)


def _with_base(target: LoraTarget, weight: torch.Tensor, bias: torch.Tensor | None) -> LoraTarget:
    return LoraTarget(target.name, target.layer.with_base(weight, bias), target.adapters, ())


def _base_float32(
    checkpoint: SafetensorsCheckpoint,
    disk: str,
    quant: Quant4bitSettings | None,
    dtype: torch.dtype,
    conv1d: bool,
) -> torch.Tensor:
    tensor = checkpoint.get(disk)
    if quant is not None:
        return _quant_dequant_float32(tensor, quant, dtype, conv1d)
    return tensor.to(torch.float32)


def _merged_producer(
    checkpoint: SafetensorsCheckpoint,
    disk: str,
    bias_disk: str | None,
    target: LoraTarget,
    quant: Quant4bitSettings | None,
    dtype: torch.dtype,
    conv1d: bool,
    name: str,
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        base = _base_float32(checkpoint, disk, quant, dtype, conv1d)
        bias = checkpoint.get(bias_disk) if bias_disk is not None else None  # lora_merge checks it exists
        weight = merged_weight_float32(_with_base(target, base, bias))
        return to_output_tensor(weight, dtype, name)

    return produce


def _merged_bias_producer(
    checkpoint: SafetensorsCheckpoint, disk: str, target: LoraTarget, dtype: torch.dtype, name: str
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        bias = merged_bias_float32(_with_base(target, torch.empty(0), checkpoint.get(disk)))
        return to_output_tensor(bias, dtype, name)

    return produce


def _plain_producer(
    checkpoint: SafetensorsCheckpoint,
    disk: str,
    quant: Quant4bitSettings | None,
    dtype: torch.dtype,
    conv1d: bool,
    name: str,
) -> Callable[[], torch.Tensor]:
    if quant is not None:
        return lambda: to_output_tensor(_base_float32(checkpoint, disk, quant, dtype, conv1d), dtype, name)
    return lambda: to_output_tensor(checkpoint.get(disk), dtype, name)


def _tensor_producer(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> Callable[[], torch.Tensor]:
    return lambda: to_output_tensor(tensor, dtype, name)


# --------------------------------------------------------------------------- files beside the weights


def _copy_files(names: Any, source: Path, staging: Path) -> list[str]:
    copied = []
    for name in names:
        path = source / name
        if path.is_file() and not (staging / name).exists():
            shutil.copy2(path, staging / name)
            copied.append(name)
    return copied


def copy_tokenizer_files(adapter_dir: Path, base_dir: Path | None, staging: Path) -> list[str]:
    """Tokenizer files from the adapter directory when it has a tokenizer, else from the base.

    tokenizer.model comes from the base when the adapter's tokenizer lacks it (GGUF converters look for it).
    """
    has_tokenizer = any((adapter_dir / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json"))
    source = adapter_dir if has_tokenizer or base_dir is None else base_dir
    copied = _copy_files(TOKENIZER_FILES, source, staging)
    if base_dir is not None and source != base_dir:
        copied += _copy_files(("tokenizer.model",), base_dir, staging)
    return sorted(copied)


def _output_dtype(requested: str | None, config: Any) -> torch.dtype:
    from fastsave.options import parse_dtype

    if requested is not None:
        return parse_dtype(requested)
    return sixteen_bit_dtype(getattr(config, "dtype", None)) or torch.bfloat16


# --------------------------------------------------------------------------- the whole job


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    base_weights: str = "dequantized",
    quant: Quant4bitSettings | None = None,
    maximum_memory_usage: float = 0.75,
    temporary_location: str | Path | None = None,
    replace_in_place: bool = False,
) -> Path:
    """Merge the adapter in ``adapter_dir`` into its 16-bit base and save the result to ``out_dir``.

    See the module docstring for what is merged into what. Returns ``out_dir``.

    Raises:
        MergeError / ValueError: a missing adapter or base, an unsupported adapter, an invalid
            option; nothing is written then.
    """
    from fastsave.save import staging_directory, write_merged_weights

    started = time.perf_counter()
    opts: SaveOptions = parse_options(
        out_dir,
        save_method=save_method,
        max_shard_size=max_shard_size,
        dtype=dtype,
        base_weights=base_weights,
        maximum_memory_usage=maximum_memory_usage,
        temporary_location=temporary_location,
        replace_in_place=replace_in_place,
    )
    quant = quant or Quant4bitSettings()
    adapter = SavedAdapter.load(adapter_dir)

    if save_method == "lora":
        with staging_directory(opts) as staging:
            files = _copy_files((ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHTS_NAMES), adapter.directory, staging)
            files += copy_tokenizer_files(adapter.directory, None, staging)
            publish(staging, opts.save_directory)
        logger.info(
            "fastsave merge: copied the adapter (%s) to %s", ", ".join(sorted(files)), opts.save_directory
        )
        return opts.save_directory

    candidates = [base] if base else [adapter.base_name]
    base_dir, tried = resolve_checkpoint_dir(
        candidates, None if base else getattr(adapter.config, "revision", None)
    )
    if base_dir is None:
        raise MergeError(
            "the 16-bit base model was not found locally "
            f"(tried: {'; '.join(tried) or 'nothing: adapter_config.json names no base_model_name_or_path'}); "
            "pass --base /path/to/base (a directory with config.json and safetensors), or download it "
            "first: fastsave never downloads"
        )
    check_not_quantized_checkpoint(base_dir, "the base", ", with --base /path/to/base")
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"the base {str(base_dir)!r} has no config.json")
    checkpoint = SafetensorsCheckpoint(base_dir)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    out_dtype = _output_dtype(dtype, config)
    model = _meta_model(config, getattr(adapter.config, "task_type", None))
    quantized = quantized_module_names(model)
    from transformers.pytorch_utils import Conv1D

    conv1d_weights = {
        f"{n}.weight" for n, m in model.named_modules() if n in quantized and isinstance(m, Conv1D)
    }
    dequantize = base_weights == "dequantized"
    plan = build_adapter_plan(model, checkpoint, adapter, out_dtype, quant if dequantize else None, quantized)
    del model
    if dequantize:
        how = (
            f"the base {base_dir} as training saw it: each of the {len(quantized)} weights a 4-bit load "
            f"quantizes was quantized to {quant.quant_type} (blocksize {quant.blocksize}, double quant "
            f"{'on' if quant.double_quant else 'off'}) and dequantized"
        )
    else:
        how = f"the original 16-bit base {base_dir} (base_weights='original')"

    if save_method == "merged_4bit_forced":
        warn_accuracy_loss()
        settings = {f"{name}.weight": quant for name in quantized}
        plan = requantize_plan(plan, settings, conv1d_weights)

    with staging_directory(opts) as staging:
        shards = write_merged_weights(plan, staging, opts)
        if save_method == "merged_4bit_forced":
            from transformers import BitsAndBytesConfig

            config.quantization_config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.quant_type,
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=out_dtype,
                bnb_4bit_quant_storage=torch.uint8,
            )
            write_4bit_config(config, staging, plan.dtype, plan.untied_embeddings)
        else:
            write_config(config, staging, plan.dtype, plan.untied_embeddings)
        _copy_files(("generation_config.json",), adapter.directory, staging)
        _copy_files(("generation_config.json",), base_dir, staging)
        tokenizer_files = copy_tokenizer_files(adapter.directory, base_dir, staging)
        publish(staging, opts.save_directory)
    lines = [
        f"fastsave merge: saved {save_method} to {opts.save_directory} in {time.perf_counter() - started:.1f}s",
        f"  merged {len(plan.lora_targets)} LoRA modules into {how}",
        f"  {len(plan.tensors)} tensors, {plan.total_bytes / 1e9:.2f} GB as {str(plan.dtype).removeprefix('torch.')}"
        f" in {len(shards)} shard(s)",
    ]
    if plan.untied_embeddings:
        lines.append(
            "  the adapter changed one of the tied embeddings: both written, tie_word_embeddings=false"
        )
    lines.append(
        f"  tokenizer files: {', '.join(tokenizer_files) or 'none found in the adapter or base directory'}"
    )
    lines.append(f"  peak RSS {peak_rss() / 2**30:.2f} GiB")
    logger.info("\n".join(lines))
    return opts.save_directory
