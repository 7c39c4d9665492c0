"""A peft adapter saved on disk (LoRA, or another tuner fastsave merges), attached to a model built
on the meta device.

No 16-bit weight is loaded: peft builds its adapter layers around the meta base (so the scaling,
rank and alpha patterns, rslora, fan_in_fan_out, DoRA and target matching are peft's own), and
the adapter file's tensors are then put in place of the meta ones, key by key, using the names
peft's own ``get_peft_model_state_dict`` gives each parameter. Every key of the file must land on
a parameter of the model, and every adapter parameter must get a value from the file: an adapter
that does not fit the base model is refused before anything runs.

An adapter saved from a model whose vocabulary was resized (added tokens) holds the resized
embeddings (peft's ``save_embedding_layers``): the meta model is resized to them first, and they
are used as peft uses them when it loads the adapter, in place of the base checkpoint's.

The result is a live peft model whose LoRA factors (and modules_to_save copies) are real and
whose base weights are still on the meta device; the save's input reads those from the base
checkpoint (fastsave.inputs.saved_adapter).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsave.adapters import tuners
from fastsave.dtypes import same_bits
from fastsave.errors import PlanError, UnsupportedAdapterError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER = "default"
# peft features whose merge is not plain LoRA/DoRA arithmetic, or that change the base weights.
_REFUSED_FIELDS = (
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "layer_replication",
    "megatron_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass
class SavedAdapter:
    """A peft LoRA adapter as saved on disk: its config and its tensors by file key."""

    directory: Path
    config: Any  # peft.LoraConfig
    weights_file: Path
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, directory: str | Path) -> SavedAdapter:
        """Read and check an adapter directory.

        Raises:
            PlanError: no such directory, no adapter files, or an empty adapter.
            UnsupportedAdapterError: not a LoRA adapter, or a LoRA feature fastsave cannot merge exactly.
        """
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise PlanError(f"adapter directory {str(directory)!r} does not exist")
        if not (directory / ADAPTER_CONFIG_NAME).is_file():
            raise PlanError(
                f"{str(directory)!r} has no {ADAPTER_CONFIG_NAME}: give the directory peft's "
                "save_pretrained wrote (a non-default adapter is in a sub-folder named after it)"
            )
        weights = next((directory / n for n in ADAPTER_WEIGHTS_NAMES if (directory / n).is_file()), None)
        if weights is None:
            raise PlanError(f"{str(directory)!r} has no {' or '.join(ADAPTER_WEIGHTS_NAMES)}")
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(directory))
        peft_type = getattr(config, "peft_type", None)
        peft_type = str(getattr(peft_type, "value", peft_type) or "")
        tuner = peft_type.lower()
        if peft_type != "LORA" and tuner not in tuners.READERS:
            why = tuners.REFUSED.get(tuner, "fastsave has no exact merge for this tuner")
            raise UnsupportedAdapterError(
                f"the adapter in {str(directory)!r} is {peft_type or 'not a peft adapter'}: {why}. Nothing was "
                "written"
            )
        for name in _REFUSED_FIELDS:
            if getattr(config, name, None):
                raise UnsupportedAdapterError(
                    f"the adapter uses peft's {name}, which fastsave does not merge exactly; keep it as an "
                    "adapter (save_method='lora')"
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

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
        if not tensors:
            raise PlanError(f"the adapter in {str(directory)!r} holds no tensor: nothing to merge")
        return cls(directory, config, weights, tensors)

    @property
    def base_name(self) -> str | None:
        """The base model the adapter was trained on, as recorded in adapter_config.json."""
        return getattr(self.config, "base_model_name_or_path", None)

    @property
    def revision(self) -> str | None:
        """The base model revision recorded in adapter_config.json."""
        return getattr(self.config, "revision", None)

    def lora_modules(self) -> list[str]:
        """The modules the file holds adapter tensors for, read from its keys alone (an independent
        census): LoRA's ``lora_A`` / ``lora_embedding_A``, another tuner's first container (peft's
        ``adapter_layer_names``)."""
        markers = [".lora_A.", ".lora_embedding_A"]
        peft_type = getattr(self.config, "peft_type", None)
        tuner = str(getattr(peft_type, "value", peft_type) or "").lower()
        if tuner in tuners.READERS:
            markers = [f".{name}" for name in tuners.adapter_containers(tuner)[:1]]
        markers.append(".trainable_tokens_delta")  # peft's trainable tokens beside any tuner
        modules = set()
        for key in self.tensors:
            name = key.removeprefix("base_model.model.")
            for marker in markers:
                if marker in name:
                    modules.add(name.split(marker)[0])
        return sorted(modules)


def _resize_to_saved_embeddings(meta_model: nn.Module, adapter: SavedAdapter) -> None:
    """Resize the meta model's embeddings to the rows of the input embedding the adapter saved (a
    model whose vocabulary grew with added tokens); nothing when it saved none or the same rows."""
    embeddings = meta_model.get_input_embeddings() if hasattr(meta_model, "get_input_embeddings") else None
    if embeddings is None:
        return
    names = {name for name, module in meta_model.named_modules() if module is embeddings}
    for key, value in adapter.tensors.items():
        name = key.removeprefix("base_model.model.")
        if (
            any(name.startswith(f"{embedding}.") for embedding in names)
            and name.endswith(".weight")
            and value.dim() == 2
            and value.shape[0] != embeddings.weight.shape[0]
        ):
            with torch.device("meta"):
                meta_model.resize_token_embeddings(int(value.shape[0]), mean_resizing=False)
            return


def _parameter_slots(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """Where each parameter and buffer lives (VeRA's shared projections are buffers)."""
    slots = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            slots[id(param)] = (module, attr)
        for attr, buffer in module.named_buffers(recurse=False):
            slots.setdefault(id(buffer), (module, attr))
    return slots


def attach_saved_adapter(meta_model: nn.Module, adapter: SavedAdapter, base_tensor=None) -> nn.Module:
    """Wrap ``meta_model`` in peft's LoRA layers for ``adapter`` and put the file's tensors in place.

    Args:
        meta_model: the base model built on the meta device.
        adapter: the loaded adapter.
        base_tensor: ``name -> tensor`` of the base checkpoint (for the base-layer copies peft
            saves beside an embedding LoRA), or None.

    Raises:
        PlanError: a key of the file that no parameter of the model takes, a LoRA parameter the file
            does not hold, or a tensor of another shape (a resized vocabulary).
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = adapter.config
    config.inference_mode = True
    _resize_to_saved_embeddings(meta_model, adapter)
    with warnings.catch_warnings():
        # peft's notes about building a model (a renamed base path, fan_in_fan_out set for Conv1D,
        # embedding tying) concern training, not reading the adapter back: kept out of the save log
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        model = get_peft_model(meta_model, config, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    params = model.state_dict(keep_vars=True)
    expected = get_peft_model_state_dict(
        model, state_dict=params, adapter_name=ADAPTER, save_embedding_layers=False
    )
    accepted = get_peft_model_state_dict(
        model, state_dict=params, adapter_name=ADAPTER, save_embedding_layers=True
    )
    unknown = sorted(set(adapter.tensors) - set(accepted))
    missing = sorted(set(expected) - set(adapter.tensors))
    if unknown or missing:
        raise PlanError(
            f"the adapter in {adapter.directory} does not fit this base model: "
            + (
                f"tensors no module of the model takes: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
                if unknown
                else ""
            )
            + (
                f"LoRA tensors the file lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                if missing
                else ""
            )
            + "check --base (the adapter's base_model_name_or_path is "
            + f"{adapter.base_name!r}). Nothing was written."
        )
    slots = _parameter_slots(model)
    for key, value in adapter.tensors.items():
        param = accepted[key]
        if tuple(value.shape) != tuple(param.shape):
            raise PlanError(
                f"the adapter's {key} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}: a resized "
                "vocabulary or another base model; merge in the training session (or check --base). "
                "Nothing was written."
            )
        if key not in expected:  # the embeddings peft saved beside the adapter (save_embedding_layers)
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            stored = base_tensor(name) if base_tensor is not None else None
            if (
                stored is not None
                and tuple(stored.shape) == tuple(value.shape)
                and same_bits(value.to(stored.dtype), stored)
            ):
                continue  # the checkpoint's own: read from it as any other base weight
            # a resized (or retrained) vocabulary: the adapter's copy is the model's, as peft loads it
        module, attr = slots[id(param)]
        if attr in module._buffers:
            module._buffers[attr] = value
        else:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return model
