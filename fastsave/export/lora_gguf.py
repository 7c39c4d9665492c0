"""A LoRA adapter as a GGUF LoRA file, with llama.cpp's own ``convert_lora_to_gguf.py``.

llama.cpp loads such a file beside the base model's GGUF (``--lora``; Ollama's ``ADAPTER`` line):
it is small, and one base GGUF serves many adapters. What it can hold is plain LoRA: per weight,
``lora_a`` and ``lora_b``, and one ``adapter.lora.alpha`` for the file, which llama.cpp turns into
the scale ``alpha / rank`` of each weight. So an adapter whose merge is anything else is refused
before anything is written, saying why: DoRA (a norm of the merged weight), rsLoRA (alpha /
sqrt(rank)), per-module alpha (``alpha_pattern``), lora_bias, trained copies of whole modules
(``modules_to_save``), trainable tokens or resized embeddings (llama.cpp's converter refuses
embeddings in an adapter), LoRA on bare parameters, another tuner.

The adapter's own tensors are written, as peft saves them, into the export's staging together
with the base model's config.json (all the converter reads of the base: no weight, no tokenizer),
and the converter runs on them in a child process, offline; the file is read back with llama.cpp's
gguf reader (an adapter of type lora, the alpha, a lora_a and lora_b per LoRA module) and only then
published into ``save_directory``, by the same atomic switch as every save.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from fastsave.errors import GGUFVerificationError, UnsupportedAdapterError
from fastsave.export.convert import run_tool
from fastsave.export.llama_cpp import LlamaCppNotFoundError, find_llama_cpp
from fastsave.export.methods import gguf_stem
from fastsave.export.verify import load_gguf
from fastsave.io.ownership import GGUF
from fastsave.options import parse_options
from fastsave.pipeline.preflight import Preflight

logger = logging.getLogger(__name__)

LORA_CONVERTER = "convert_lora_to_gguf.py"
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def lora_outtype(quantization_method: Any) -> str:
    """The converter's outtype for ``quantization_method`` as Unsloth reads it for a LoRA GGUF: one of
    f32, f16, bf16, q8_0 (a one-element list unwrapped); None or "fast_quantized": f16.

    Raises:
        ValueError: anything else (k-quants do not apply to an adapter).
    """
    method = quantization_method
    if isinstance(method, (list, tuple)) and len(method) == 1:
        method = method[0]
    if method is None or method == "fast_quantized":
        return "f16"
    if isinstance(method, str) and method.lower() in LORA_OUTTYPES:
        return method.lower()
    raise ValueError(
        f"a LoRA adapter is exported to GGUF as one of {', '.join(LORA_OUTTYPES)} (llama.cpp's "
        f"convert_lora_to_gguf.py), not {quantization_method!r}"
    )


def lora_gguf_refusals(config: Any) -> list[str]:
    """Why llama.cpp cannot load this peft adapter config as a GGUF LoRA (empty: it can)."""
    peft_type = getattr(config, "peft_type", None)
    peft_type = str(getattr(peft_type, "value", peft_type) or "")
    if peft_type != "LORA":
        return [f"it is a {peft_type or 'non-peft'} adapter, and a GGUF LoRA file holds plain LoRA only"]
    reasons = []
    checks = {
        "use_dora": "DoRA rescales the merged weight by its norm, which llama.cpp's LoRA does not",
        "use_rslora": "rsLoRA scales by alpha / sqrt(rank); llama.cpp scales by alpha / rank",
        "alpha_pattern": "alpha differs between modules (alpha_pattern); the file holds one alpha",
        "lora_bias": "lora_bias adds a bias, which llama.cpp's LoRA does not hold",
        "modules_to_save": "modules_to_save keeps trained copies of whole modules, not LoRA factors",
        "trainable_token_indices": "trainable tokens change embedding rows, which an adapter file cannot hold",
        "target_parameters": "LoRA on bare parameters (MoE expert stacks) has no GGUF LoRA layout",
        "layer_replication": "layer replication changes the model's layers",
    }
    for field, why in checks.items():
        if getattr(config, field, None):
            reasons.append(why)
    return reasons


def _adapter_name(model: nn.Module, adapter_names: Any) -> str:
    if adapter_names is not None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(
                f"a GGUF LoRA file holds one adapter; adapter_names={names!r} names {len(names)}"
            )
        return names[0]
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
    active = [active] if isinstance(active, str) else list(active)
    if len(active) != 1:
        raise ValueError(
            f"a GGUF LoRA file holds one adapter; the model has {active} active: pass adapter_names"
        )
    return active[0]


def save_lora_gguf(
    model: nn.Module,
    save_directory: str | Path,
    outtype: str = "f16",
    *,
    llama_cpp: str | Path | None = None,
    adapter_names: Any = None,
    **options: Any,
) -> str:
    """Write ``model``'s LoRA adapter as ``<model>-lora-<outtype>.gguf`` in ``save_directory``.

    Args:
        model: a peft model with a plain LoRA adapter.
        save_directory: receives the GGUF file (other files there are kept).
        outtype: f32, f16, bf16 or q8_0 (see :func:`lora_outtype`).
        llama_cpp: a llama.cpp checkout (else ``FASTSAVE_LLAMA_CPP``, else ./llama.cpp).
        adapter_names: the adapter to export (one); default: the active one.
        **options: save options (push_to_hub, token, repo_id, temporary_location, ...).

    Returns:
        The path of the GGUF file (the hub URL is logged when pushed).

    Raises:
        UnsupportedAdapterError: an adapter llama.cpp cannot load as a LoRA file, with the reason;
        ValueError: no peft model, an invalid outtype; LlamaCppNotFoundError: no converter. All
        before anything is written. GGUFConversionError / GGUFVerificationError: the converter
        failed or wrote something else; nothing is published then.
    """
    outtype = lora_outtype(outtype)
    if not hasattr(model, "peft_config"):
        raise ValueError("a LoRA GGUF is made from a peft model's adapter, and this model has none")
    name = _adapter_name(model, adapter_names)
    if name not in model.peft_config:
        raise ValueError(f"adapter {name!r} not found; the model has {sorted(model.peft_config)}")
    config = model.peft_config[name]
    reasons = lora_gguf_refusals(config)
    if reasons:
        raise UnsupportedAdapterError(
            f"adapter {name!r} cannot be exported as a GGUF LoRA file: {'; '.join(reasons)}. llama.cpp loads "
            "plain LoRA only: merge it instead (save_pretrained_gguf with save_method='merged_16bit'). "
            "Nothing was written."
        )
    return_url = options.pop("_return_url", False)
    opts = parse_options(save_directory, save_method="lora", **options)

    def stage(work: Path) -> tuple[Path, Path]:
        adapter_dir, base_dir = work / "adapter", work / "base-config"
        base_dir.mkdir()
        model.save_pretrained(str(adapter_dir), selected_adapters=[name], save_embedding_layers=False)
        _stage_base_config(_inner_config(model), base_dir)
        # peft puts a non-default adapter in a sub-folder named after it
        return (adapter_dir if name == "default" else adapter_dir / name), base_dir

    modules = len(_lora_modules(model, name))
    file_name = f"{gguf_stem(model)}-lora-{outtype}.gguf"
    path, url = convert_lora(opts, llama_cpp, outtype, file_name, float(config.lora_alpha), modules, stage)
    return (url or "") if return_url else path


def push_lora_gguf(
    model: nn.Module, repo_id: str, outtype: str = "f16", *, use_temp_dir: bool | None = None, **options: Any
) -> str:
    """:func:`save_lora_gguf`, then upload the file to the hub as ``repo_id``; returns the URL. The file
    is written into a temporary directory removed after the upload (``use_temp_dir`` None or True), or
    into a local folder named after the repo (False)."""
    import tempfile

    options = {**options, "push_to_hub": True, "repo_id": options.get("repo_id") or repo_id}
    if use_temp_dir is False:
        return _push(model, Path(repo_id).name, outtype, options)
    with tempfile.TemporaryDirectory(prefix="fastsave-lora-gguf-") as temporary:
        return _push(model, Path(temporary) / Path(repo_id).name, outtype, options)


def _push(model: nn.Module, directory: Path | str, outtype: str, options: dict[str, Any]) -> str:
    llama_cpp = options.pop("llama_cpp", None)
    adapter_names = options.pop("adapter_names", None)
    options["_return_url"] = True
    return save_lora_gguf(
        model, directory, outtype, llama_cpp=llama_cpp, adapter_names=adapter_names, **options
    )


def save_saved_lora_gguf(
    adapter_dir: str | Path,
    out_dir: str | Path,
    outtype: str = "f16",
    *,
    base: str | Path | None = None,
    llama_cpp: str | Path | None = None,
    **options: Any,
) -> str:
    """The same for an adapter saved on disk (``fastsave merge ADAPTER OUT --save-method lora --gguf f16``):
    its files are converted as they are, with the config of its base (``base``, else the adapter's
    base_model_name_or_path, found locally as ``fastsave merge`` finds it).

    Raises:
        see :func:`save_lora_gguf`; PlanError: no adapter there, or no base config found.
    """
    from fastsave.adapters.saved_file import SavedAdapter
    from fastsave.inputs.saved_adapter import SavedAdapterInput

    outtype = lora_outtype(outtype)
    adapter = SavedAdapter.load(adapter_dir)
    reasons = lora_gguf_refusals(adapter.config)
    if any(".embed_tokens." in key or ".lm_head." in key for key in adapter.tensors if "lora_" not in key):
        reasons.append(
            "it holds whole embedding layers (a resized vocabulary), which llama.cpp's converter refuses"
        )
    if reasons:
        raise UnsupportedAdapterError(
            f"the adapter in {str(adapter_dir)!r} cannot be exported as a GGUF LoRA file: {'; '.join(reasons)}. "
            "Merge it instead (fastsave merge without --save-method lora). Nothing was written."
        )
    base_dir, _, config = SavedAdapterInput(adapter_dir, base, None).resolve_base()
    opts = parse_options(out_dir, save_method="lora", **options)

    def stage(work: Path) -> tuple[Path, Path]:
        base_config = work / "base-config"
        base_config.mkdir()
        _stage_base_config(config, base_config)
        return Path(adapter_dir).absolute(), base_config

    modules = len(adapter.lora_modules())
    stem = (getattr(config, "_name_or_path", "") or Path(base_dir).name).rstrip("/").rsplit("/", 1)[
        -1
    ] or "model"
    return convert_lora(
        opts,
        llama_cpp,
        outtype,
        f"{stem}-lora-{outtype}.gguf",
        float(adapter.config.lora_alpha),
        modules,
        stage,
    )[0]


def convert_lora(
    opts: Any,
    llama_cpp: str | Path | None,
    outtype: str,
    file_name: str,
    alpha: float,
    modules: int,
    stage: Any,
) -> tuple[str, str | None]:
    """Stage the adapter and the base config (``stage(work) -> (adapter_dir, base_config_dir)``), run
    the converter, check what it wrote and publish it into ``opts.save_directory``, upload it when
    asked; returns the file's path and the hub URL (None when not pushed)."""
    tools = find_llama_cpp(llama_cpp)
    converter = tools.root / LORA_CONVERTER
    if not converter.is_file():
        raise LlamaCppNotFoundError(
            f"{tools.root} has no {LORA_CONVERTER} (llama.cpp's LoRA converter, beside convert_hf_to_gguf.py): "
            "use a complete llama.cpp checkout"
        )
    gguf = load_gguf(tools)
    started = time.perf_counter()
    preflight = Preflight(opts, kind=GGUF)
    with preflight as work:
        adapter_dir, base_dir = stage(work)
        target = work / file_name
        command = [sys.executable, str(converter), str(adapter_dir), "--base", str(base_dir.absolute())]
        command += ["--outfile", str(target.absolute()), "--outtype", outtype]
        seconds = run_tool(command, f"llama.cpp's {LORA_CONVERTER}", work)
        _verify(gguf, target, alpha, modules)
        for staged in work.iterdir():
            if staged.is_dir():
                shutil.rmtree(staged)
        preflight.pending.publish()
    path = opts.save_directory / file_name
    logger.info(
        "fastsave: LoRA GGUF %s (%.2f MB, %s, %d LoRA modules, alpha %g) in %.1fs (converter %.1fs)",
        path,
        path.stat().st_size / 1e6,
        outtype,
        modules,
        alpha,
        time.perf_counter() - started,
        seconds,
    )
    url = None
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        url = upload_directory(opts)
    return str(path), url


def _inner_config(model: nn.Module) -> Any:
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return inner.config


def _stage_base_config(model_config: Any, directory: Path) -> None:
    """The base model's config.json, without the quantization it was loaded with (all the converter reads)."""
    config = model_config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))


def _lora_modules(model: nn.Module, adapter: str) -> list[str]:
    from fastsave.adapters.live_peft import adapter_names_of

    return [n for n, m in model.named_modules() if adapter in adapter_names_of(m) and hasattr(m, "lora_A")]


def _verify(gguf: Any, path: Path, alpha: float, modules: int) -> None:
    """The file is a LoRA adapter with this alpha and a lora_a and lora_b for every LoRA module."""
    reader = gguf.GGUFReader(str(path))
    fields = {
        key: reader.fields[key].contents() for key in ("general.type", "adapter.type", "adapter.lora.alpha")
    }
    pairs = sum(1 for t in reader.tensors if t.name.endswith(".lora_a"))
    problems = []
    if fields["general.type"] != "adapter" or fields["adapter.type"] != "lora":
        problems.append(f"type {fields['general.type']}/{fields['adapter.type']}, not adapter/lora")
    if abs(float(fields["adapter.lora.alpha"]) - alpha) > 1e-6 * max(1.0, abs(alpha)):
        problems.append(f"alpha {fields['adapter.lora.alpha']}, not {alpha}")
    if pairs != modules or 2 * pairs != len(reader.tensors):
        problems.append(f"{pairs} lora_a of {len(reader.tensors)} tensors for {modules} LoRA modules")
    if problems:
        raise GGUFVerificationError(
            f"{path.name} is not the adapter: {'; '.join(problems)}; nothing was published"
        )
