"""A merged model quantized with torchao (``save_pretrained_torchao``), as transformers saves one.

The model is merged exactly as ``merged_16bit`` writes it (the same plan, streamed into a 16-bit
checkpoint in the save's own staging), then transformers loads that checkpoint with
``TorchAoConfig(torchao_config)``: its torchao quantizer runs torchao's own ``quantize_`` on each
Linear as it is loaded, one module at a time, from the memory-mapped 16-bit file (the process
holds the quantized model plus one 16-bit weight, never the 16-bit model). transformers'
``save_pretrained`` then writes what it writes for a torchao model (safetensors, config.json with
the ``quantization_config`` a loader reads back), the 16-bit checkpoint is removed, and the result
is published by the same atomic switch as every save. The quantized tensors are torchao's own
``quantize_`` of fastsave's merged 16-bit model, bit for bit (tests/test_torchao_export.py).

On the CPU, Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig and
Float8WeightOnlyConfig quantize and save; Int4WeightOnlyConfig and
Float8DynamicActivationFloat8WeightConfig need torchao's GPU kernels (transformers' conversion
fails on the CPU with torchao 0.18): they are run where the model is on a GPU.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.collector import older_objects_frozen
from fastsave.io.ownership import MERGED, TOKENIZER_FILES
from fastsave.options import parse_options
from fastsave.pipeline.preflight import Preflight, check_model, check_tokenizer

logger = logging.getLogger(__name__)

CPU_CONFIGS = ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Float8WeightOnlyConfig")
GPU_CONFIGS = ("Int4WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig")


def torchao_quant_type(torchao_config: Any) -> Any:
    """The torchao config to quantize with: a torchao ``AOBaseConfig``, or the one a transformers
    ``TorchAoConfig`` holds.

    Raises:
        ValueError: none given (naming the configs to choose from), or not a torchao config.
    """
    if torchao_config is None:
        raise ValueError(
            "save_pretrained_torchao needs torchao_config=, a torchao quantization config, for example "
            "torchao.quantization.Int8WeightOnlyConfig() or Int8DynamicActivationInt8WeightConfig() "
            f"(these and {CPU_CONFIGS[2]} run on the CPU; {', '.join(GPU_CONFIGS)} need a GPU). Nothing was written."
        )
    quant_type = getattr(torchao_config, "quant_type", torchao_config)  # transformers' TorchAoConfig
    from torchao.core.config import AOBaseConfig

    if not isinstance(quant_type, AOBaseConfig):
        raise ValueError(
            f"torchao_config must be a torchao config (e.g. Int8WeightOnlyConfig()) or a transformers "
            f"TorchAoConfig, got {type(torchao_config).__name__}"
        )
    return quant_type


def save_pretrained_torchao(
    model: nn.Module,
    save_directory: str | Path,
    tokenizer: Any = None,
    torchao_config: Any = None,
    push_to_hub: bool = False,
    token: str | bool | None = None,
    **options: Any,
) -> str:
    """Merge ``model`` and save it quantized with ``torchao_config`` (see the module docstring).

    Args:
        model: a peft model (or a model with no adapter, saved as it is) that fastsave can merge.
        save_directory: the output directory (replaced in one step; other files are kept).
        tokenizer: its files are saved beside the weights when given.
        torchao_config: a torchao config (``Int8WeightOnlyConfig()``...) or a ``TorchAoConfig``.
        push_to_hub, token: upload after the local save (``repo_id`` option, else save_directory).
        **options: fastsave's save options (adapter_names, base_weights, maximum_memory_usage, ...).

    Returns:
        The saved directory's path (or the hub URL when pushed).

    Raises:
        ValueError: no or no torchao config, an invalid option; before anything is written.
        Whatever transformers' torchao quantizer raises for a config it cannot run here (nothing is
        published then).
    """
    if torchao_config is None and getattr(model, "_torchao_config", None) is not None:
        raise ValueError(
            "this model carries a torchao config from quantization-aware training (Unsloth's qat_scheme); "
            "fastsave does not convert QAT models yet: pass torchao_config= explicitly, or save it with "
            "Unsloth. Nothing was written."
        )
    quant_type = torchao_quant_type(torchao_config)
    opts = parse_options(
        save_directory, save_method="merged_16bit", push_to_hub=push_to_hub, token=token, **options
    )
    check_model(model, opts)
    check_tokenizer(tokenizer)
    from dataclasses import replace

    from transformers import TorchAoConfig

    from fastsave.inputs.live_model import LiveModelInput
    from fastsave.pipeline.run import output_plan
    from fastsave.pipeline.write import write_merged_weights
    from fastsave.plan.walk import unwrap_peft

    started = time.perf_counter()
    preflight = Preflight(opts, kind=MERGED)
    # the model's objects sit out collections while the merge streams (fastsave.collector)
    with older_objects_frozen(), preflight as work:
        merged = work / "merged-16bit"
        merged.mkdir()
        merged_opts = replace(opts, save_directory=merged, push_to_hub=False, variant=None)
        save_input = LiveModelInput(model, tokenizer)
        plan = output_plan(save_input, merged_opts)
        write_merged_weights(plan, merged, merged_opts)
        save_input.write_files(merged, plan, merged_opts, None)
        merge_seconds = time.perf_counter() - started
        model_class = type(unwrap_peft(model))
        quantized = model_class.from_pretrained(
            merged, dtype=plan.dtype, quantization_config=TorchAoConfig(quant_type), device_map="cpu"
        )
        quantized.save_pretrained(work, safe_serialization=True)
        del quantized
        for name in TOKENIZER_FILES:
            if (merged / name).is_file():
                shutil.copy2(merged / name, work / name)
        shutil.rmtree(merged)
        preflight.pending.publish()
    logger.info(
        "fastsave: %s saved with torchao %s in %.1fs (merge %.1fs, quantize and save %.1fs)",
        opts.save_directory,
        type(quant_type).__name__,
        time.perf_counter() - started,
        merge_seconds,
        time.perf_counter() - started - merge_seconds,
    )
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        return upload_directory(opts)
    return str(opts.save_directory)
