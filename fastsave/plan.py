"""The save plan: every output tensor (name, shape, dtype, how to produce it) before any merge runs.

Walking the model once up front lets the writer lay out shards and safetensors headers before the
first byte of merged weight exists, and lets the safety checks (no quantized or LoRA tensor, every
LoRA module merged exactly once) run before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastsave.errors import PlanError
from fastsave.lora_merge import (
    LoraTarget,
    UnsupportedAdapterError,
    check_supported,
    find_lora_targets,
    is_lora_layer,
    is_other_tuner_layer,
    is_param_wrapper,
    merged_bias_float32,
    merged_weight_float32,
    row_block_deltas,
)
from fastsave.quantized import (
    base_weight_float32,
    compute_dtype_of,
    is_4bit,
    is_quantized,
    logical_weight_shape,
    to_checkpoint_layout,
)
from fastsave.rounding import round_once
from fastsave.row_blocks import merge_in_row_blocks

try:
    from peft.utils.other import ModulesToSaveWrapper
except ImportError:  # pragma: no cover - peft is a dependency
    ModulesToSaveWrapper = ()

# Names that only a quantized or unmerged state dict contains; a merged save must hold none.
_FORBIDDEN_NAME = re.compile(
    r"(^|\.)(base_layer|lora_[A-Za-z_]+|absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_format)(\.|$)"
    r"|quant_state|^base_model\.model\."
)


@dataclass
class PlannedTensor:
    """One tensor of the output checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor] = field(repr=False)
    lora_module: str | None = None  # set for the weight of a merged LoRA module

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SharedProducer:
    """Produce functions for several planned tensors that one computation makes together.

    The first part asked for runs ``make`` (name -> tensor); each part is then handed out once.
    The producer asks for tensors in plan order and a group's parts stand together there, so only
    one group's parts are held at a time.
    """

    def __init__(self, make: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._make = make
        self._parts: dict[str, torch.Tensor] | None = None

    def part(self, name: str) -> Callable[[], torch.Tensor]:
        """The produce function of the part ``name``."""

        def produce() -> torch.Tensor:
            if self._parts is None:
                self._parts = dict(self._make())
            tensor = self._parts.pop(name)
            if not self._parts:
                self._parts = None
            return tensor

        return produce


@dataclass
class SavePlan:
    """Everything the producer and writer need, decided before any weight is merged."""

    tensors: list[PlannedTensor]
    dtype: torch.dtype
    lora_targets: list[LoraTarget]
    untied_embeddings: bool  # tied input/output embeddings that the adapter made differ
    tied_written_once: list[tuple[str, str]]  # (kept name, dropped name)
    # Every module holding LoRA weights of a selected adapter, counted by a walk of its own
    # (not from lora_targets), so that check_plan catches a module the merge would skip.
    lora_modules: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the whole checkpoint."""
        return sum(t.nbytes for t in self.tensors)


class TiedWeights:
    """Which parameters are written, when one parameter object sits under two names (tied embeddings).

    Identical tied tensors are written once (under the first name) and stay tied; when an adapter
    changes one side, both are written and the checkpoint must say the embeddings are untied.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, bool]] = {}  # id(parameter) -> (output name, written modified?)
        self.untied = False
        self.written_once: list[tuple[str, str]] = []  # (kept name, dropped name)

    def should_write(self, name: str, source: torch.Tensor, modified: bool) -> bool:
        """Record ``source`` under ``name``; False when it is an unmodified duplicate of a written tensor."""
        key = id(source)
        if key in self._seen:
            first_name, first_modified = self._seen[key]
            if not first_modified and not modified:
                self.written_once.append((first_name, name))
                return False
            self.untied = True
        else:
            self._seen[key] = (name, modified)
        return True


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself), under any torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_output_dtype(root: nn.Module, requested: torch.dtype | None) -> torch.dtype:
    """The dtype of the merged weights: the requested one, else the 16-bit dtype the model computes in."""
    if requested is not None:
        return requested
    for module in root.modules():
        if is_4bit(module):
            dtype = compute_dtype_of(module)
            if dtype in (torch.float16, torch.bfloat16):
                return dtype
            break
    config = getattr(root, "config", None)
    quant = getattr(config, "quantization_config", None)
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) if quant is not None else None
    if isinstance(quant, dict):
        compute = quant.get("bnb_4bit_compute_dtype")
    for candidate in (getattr(config, "dtype", None), getattr(config, "torch_dtype", None), compute):
        if (found := sixteen_bit_dtype(candidate)) is not None:
            return found
    # A model loaded in float32: 16-bit output still, bfloat16 because it cannot overflow.
    return torch.bfloat16


def sixteen_bit_dtype(value: object) -> torch.dtype | None:
    """torch.float16 / torch.bfloat16 for those dtypes or their names ("float16", "bfloat16"), else None."""
    if isinstance(value, str):
        value = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(value)
    return value if value in (torch.float16, torch.bfloat16) else None


def lora_module_census(root: nn.Module, adapter_names: Sequence[str] | None) -> list[str]:
    """Names of every module that holds LoRA weights for a selected adapter.

    Deliberately independent of :func:`fastsave.lora_merge.find_lora_targets`: it looks only for
    ``lora_A`` / ``lora_embedding_A`` weights, whatever class the module has.
    """
    names = []
    for name, module in root.named_modules():
        keys: set[str] = set()
        for attr in ("lora_A", "lora_embedding_A"):
            holder = getattr(module, attr, None)
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
            names.append(name)
    return names


def _refuse_other_tuners(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if is_other_tuner_layer(module):
            kind = type(module)
            parts = kind.__module__.split(".")
            method = parts[2].upper() if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else "non-LoRA"
            raise UnsupportedAdapterError(
                f"{name} is a {method} adapter layer ({kind.__module__}.{kind.__name__}): fastsave merges "
                "LoRA (and DoRA) adapters only, and will not write this model unmerged under a 'merged' "
                "save; save this adapter with save_method='lora'"
            )


def to_output_tensor(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Round ``tensor`` once to the output dtype and bring it to the CPU for the writer.

    Raises:
        PlanError: NaN/Inf in the tensor, or a float16 overflow, naming the tensor.
    """
    return round_once(tensor, dtype, name).detach().to("cpu").contiguous()


def _merged_weight_producer(target: LoraTarget, name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    # build_plan has run check_supported on every target before any producer runs
    def produce() -> torch.Tensor:
        base = target.layer.get_base_layer()
        deltas = row_block_deltas(target)
        if deltas is not None:
            merged = merge_in_row_blocks(base, deltas, dtype, name)
            if merged is not None:
                return to_checkpoint_layout(base, merged).contiguous()
        return to_output_tensor(to_checkpoint_layout(base, merged_weight_float32(target)), dtype, name)

    return produce


def _merged_bias_producer(target: LoraTarget, name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: to_output_tensor(merged_bias_float32(target), dtype, name)


def _plain_producer(
    module: nn.Module, attr: str, name: str, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    if attr == "weight" and is_quantized(module):

        def produce() -> torch.Tensor:
            weight = merge_in_row_blocks(module, [], dtype, name)
            if weight is not None:
                return to_checkpoint_layout(module, weight).contiguous()
            return to_output_tensor(to_checkpoint_layout(module, base_weight_float32(module)), dtype, name)

        return produce
    return lambda: to_output_tensor(getattr(module, attr), dtype, name)


def _output_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    # bitsandbytes parameters hold integer codes of a floating-point weight
    quantized = type(tensor).__name__ in ("Params4bit", "Int8Params") and not tensor.is_floating_point()
    return dtype if tensor.is_floating_point() or quantized else tensor.dtype


def _saved_wrapper_module(wrapper: nn.Module, adapter_names: Sequence[str] | None) -> nn.Module:
    copies = wrapper.modules_to_save
    wanted = [a for a in (adapter_names or []) if a in copies]
    if not wanted:
        active = wrapper.active_adapter
        wanted = [a for a in (active if isinstance(active, list) else [active]) if a in copies]
    if not wanted or getattr(wrapper, "disable_adapters", False):
        return wrapper.original_module
    return copies[wanted[0]]


def _add_buffers(module: nn.Module, prefix: str, add: Callable, out_dtype: torch.dtype) -> None:
    """Plan the persistent buffers of one module (not its children's)."""
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for attr, buf in module.named_buffers(recurse=False):
        if attr not in non_persistent and buf is not None:
            add(prefix + attr, buf, _plain_producer(module, attr, prefix + attr, out_dtype), buf.shape, False)


def build_plan(model: nn.Module, dtype: torch.dtype | None, adapter_names: Sequence[str] | None) -> SavePlan:
    """Walk the model once and list every tensor a merged 16-bit checkpoint holds.

    Raises:
        PlanError: no LoRA layer to merge, an adapter name that does not exist, an unsupported
            adapter type, or a plan that would write a quantized or LoRA tensor.
    """
    root = unwrap_peft(model)
    _refuse_other_tuners(root)
    out_dtype = resolve_output_dtype(root, dtype)
    targets = find_lora_targets(root, adapter_names)
    if adapter_names is not None:
        present = {a for t in targets for a in t.adapters + t.already_merged}
        missing = [a for a in adapter_names if a not in present]
        if missing:
            raise PlanError(f"adapter(s) {missing} not found in the model's LoRA layers; check adapter_names")
    if not targets:
        raise PlanError(
            "the model has no LoRA layer with an active adapter, so there is nothing to merge: pass a peft "
            "model with a LoRA adapter (or save the base model with save_pretrained)"
        )
    for target in targets:
        check_supported(target)
    target_by_module = {id(t.layer): t for t in targets}

    tensors: list[PlannedTensor] = []
    ties = TiedWeights()
    skip_prefixes: list[str] = []
    counts: dict[int, int] = {}
    for _, param in root.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    shared_ids = {key for key, count in counts.items() if count > 1}

    def add(
        name: str, source: torch.Tensor, produce: Callable[[], torch.Tensor], shape, modified: bool, lora=None
    ):
        if ties.should_write(name, source, modified):
            tensors.append(PlannedTensor(name, tuple(shape), _output_dtype(source, out_dtype), produce, lora))

    def add_parameters(
        module: nn.Module,
        prefix: str,
        modified: bool = False,
        merged: dict[str, LoraTarget | None] | None = None,
    ) -> None:
        """The module's own parameters: as held, or merged where ``merged`` maps one to a LoRA target."""
        for attr, param in module.named_parameters(recurse=False):
            name = prefix + attr
            target = merged.get(attr) if merged else None
            if target is not None:
                producer = _merged_weight_producer(target, name, out_dtype)
                add(name, param, producer, param.shape, bool(target.adapters), lora=target.name)
            else:
                shape = logical_weight_shape(module) if attr == "weight" else param.shape
                add(name, param, _plain_producer(module, attr, name, out_dtype), shape, modified)

    for name, module in root.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if is_param_wrapper(module):
            # LoRA on bare parameters of one module (peft nests one ParamWrapper a parameter): the
            # module's tensors under its own names, the wrapped ones merged
            skip_prefixes.append(prefix)
            wrapped: dict[str, LoraTarget | None] = {}
            inner = module
            while is_param_wrapper(inner):
                wrapped[inner.parameter_name] = target_by_module.get(id(inner))
                inner = inner.base_layer
            for sub_name, sub in inner.named_modules():
                sub_prefix = prefix + (f"{sub_name}." if sub_name else "")
                add_parameters(sub, sub_prefix, merged=None if sub_name else wrapped)
                _add_buffers(sub, sub_prefix, add, out_dtype)
            continue
        if is_lora_layer(module):
            skip_prefixes.append(prefix)
            base_layer = module.get_base_layer()
            target = target_by_module.get(id(module))
            if target is None:  # a LoRA layer whose adapters are not selected: save the base as it is
                add(
                    prefix + "weight",
                    base_layer.weight,
                    _plain_producer(base_layer, "weight", prefix + "weight", out_dtype),
                    logical_weight_shape(base_layer),
                    False,
                )
                if getattr(base_layer, "bias", None) is not None:
                    add(
                        prefix + "bias",
                        base_layer.bias,
                        _plain_producer(base_layer, "bias", prefix + "bias", out_dtype),
                        base_layer.bias.shape,
                        False,
                    )
                continue
            add(
                prefix + "weight",
                base_layer.weight,
                _merged_weight_producer(target, prefix + "weight", out_dtype),
                logical_weight_shape(base_layer),
                bool(target.adapters),
                lora=name,
            )
            if getattr(base_layer, "bias", None) is not None:
                add(
                    prefix + "bias",
                    base_layer.bias,
                    _merged_bias_producer(target, prefix + "bias", out_dtype),
                    base_layer.bias.shape,
                    any(target.layer.lora_bias.get(a, False) for a in target.adapters),
                )
            continue
        if ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            skip_prefixes.append(prefix)
            saved = _saved_wrapper_module(module, adapter_names)
            modified = saved is not module.original_module
            if modified and any(id(p) in shared_ids for p in module.original_module.parameters()):
                ties.untied = True  # the trained copy replaces one side of a tied pair
            for sub_name, sub in saved.named_modules():
                add_parameters(sub, prefix + (f"{sub_name}." if sub_name else ""), modified)
            continue
        add_parameters(module, prefix)
        _add_buffers(module, prefix, add, out_dtype)

    plan = SavePlan(
        tensors, out_dtype, targets, ties.untied, ties.written_once, lora_module_census(root, adapter_names)
    )
    check_plan(plan)
    return plan


def check_plan(plan: SavePlan) -> None:
    """The end-of-plan safety net: unique names, no quantized/LoRA tensor, every LoRA module merged once.

    Raises:
        PlanError: the plan would write a checkpoint that is not a plain merged model.
    """
    names = [t.name for t in plan.tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"the plan names these tensors twice: {duplicates}")
    bad = [n for n in names if _FORBIDDEN_NAME.search(n)]
    if bad:
        raise PlanError(
            f"refusing to write a 'merged' checkpoint that holds quantized or LoRA tensors: {bad[:8]}"
            + (" ..." if len(bad) > 8 else "")
        )
    merged = sorted(t.lora_module for t in plan.tensors if t.lora_module is not None)
    expected = sorted(t.name for t in plan.lora_targets)
    census = sorted(plan.lora_modules) if plan.lora_modules else expected
    if merged != expected or merged != census:
        lora = sorted(set(expected) | set(census))
        missing = sorted(set(lora) - set(merged))
        extra = sorted(set(merged) - set(lora))
        raise PlanError(
            f"{len(merged)} merged modules planned for {len(lora)} LoRA modules "
            f"(the model holds LoRA weights in {len(census)}); a partial merge is never saved. "
            f"Not merged: {missing}; unexpected: {extra}"
        )
