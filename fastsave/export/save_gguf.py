"""``save_pretrained_gguf`` / ``push_to_hub_gguf``: the merged model as GGUF files, from the same one line.

1. Everything is checked before any work: options, quantization methods, the tokenizer (a GGUF
   carries its vocabulary), llama.cpp (and llama-quantize when a type needs it), and disk space for
   the temporary 16-bit checkpoint and the GGUF files together.
2. The model is merged into a temporary 16-bit checkpoint inside the export's staging directory
   with the plan and the writer every save uses (fastsave.pipeline: streamed, exact, bounded in
   memory as always); float32 when f32 is asked.
3. llama.cpp's own convert_hf_to_gguf.py converts it (f32, f16, bf16 and q8_0 directly); the
   checkpoint is removed; llama-quantize makes every other type from that first file.
4. Every GGUF is verified against the checkpoint with the gguf package (tensor count, shapes,
   vocabulary size), gets a model card, and is published into ``save_directory`` in one step; the
   log gives each file's path and size.

Files are named as Unsloth names them: ``<model>.<TYPE>.gguf`` (``llama-3-8b.Q4_K_M.gguf``).
Unlike Unsloth, the 16-bit checkpoint is not kept (save it with ``save_pretrained_merged`` when you
want it) and the GGUF files go into ``save_directory`` itself, not ``save_directory + "_gguf"``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsave.collector import older_objects_frozen
from fastsave.dtypes import GGUF_TYPES, dtype_of_gguf_type
from fastsave.export.added_tokens import stage_added_tokens
from fastsave.export.convert import convert_checkpoint, quantize_gguf, split_parts
from fastsave.export.feed import FED_OUTTYPES, convert_from_plan, feed_unavailable_reason
from fastsave.export.llama_cpp import find_llama_cpp
from fastsave.export.methods import DEFAULT_METHOD, file_type_name, gguf_stem, is_lora, normalize_methods
from fastsave.export.methods import first_conversion as choose_first_conversion
from fastsave.export.space import check_export_space, logical_parameter_count
from fastsave.export.verify import facts_from_plan, load_gguf, verify_gguf
from fastsave.io.model_card import facts_from_model, place_model_card, render_model_card
from fastsave.log import shows_its_lines
from fastsave.options import SaveOptions, parse_gguf_options
from fastsave.pipeline.preflight import not_main_process

logger = logging.getLogger(__name__)


def _checkpoint_options(opts: SaveOptions, checkpoint: Path, dtype: torch.dtype) -> SaveOptions:
    """The GGUF export's options for the 16-bit checkpoint the converter reads: the same merge
    (base weights, adapters, memory, given tensors), plain file names, nothing uploaded."""
    return replace(
        opts,
        save_directory=checkpoint,
        save_method="merged_16bit",
        dtype=dtype,
        max_shard_size=SaveOptions.max_shard_size,
        safe_serialization=True,
        variant=None,
        push_to_hub=False,
    )


@shows_its_lines
def save_pretrained_gguf(
    model: nn.Module,
    save_directory: str | Path,
    tokenizer: Any = None,
    quantization_method: Any = DEFAULT_METHOD,
    *,
    llama_cpp: str | Path | None = None,
    first_conversion: str | None = None,
    imatrix_file: str | Path | None = None,
    **options: Any,
) -> list[str] | None:
    """Merge ``model`` and write it as GGUF file(s) into ``save_directory`` (see the module docstring).

    Args:
        model: a peft model (or a transformers model with a LoRA adapter), 4-bit, 8-bit or 16-bit.
        save_directory: receives ``<model>.<TYPE>.gguf`` per method, and a README.md model card.
        tokenizer: required: the GGUF file carries the vocabulary.
        quantization_method: Unsloth's names: "fast_quantized" (q8_0, the default), "quantized"
            (q4_k_m), "not_quantized" (the checkpoint's 16-bit dtype), or f32, f16, bf16, q8_0, or a
            llama-quantize type (q4_k_m, q5_k_m, q6_k, ...); or a list of them.
        llama_cpp: a llama.cpp checkout (else ``FASTSAVE_LLAMA_CPP``, else ./llama.cpp).
        first_conversion: the converter's output type when quantizing further (default: 16-bit).
        imatrix_file: an importance matrix for llama-quantize (needed by the iq* types).
        gguf_shard_size (option): split each GGUF into parts of at most this many bytes (int or
            "2GB"), in llama.cpp's own layout (``<name>-00001-of-0000N.gguf``, loaded as one model);
            for f32, f16, bf16 and q8_0.
        **options: the options of ``save_pretrained_merged`` (dtype, base_weights, temporary_location,
            maximum_memory_usage, adapter_names, tags, datasets, push_to_hub, token, ...).

    Returns:
        The paths of the GGUF files written (also with ``push_to_hub=True``; the URL is logged);
        None with ``is_main_process=False``, which returns before anything is checked.

    Raises:
        ValueError / TypeError: an invalid option or method, or no tokenizer; LlamaCppNotFoundError:
        no llama.cpp (or llama-quantize when needed); DiskSpaceError: no room. All before any work.
        GGUFConversionError / GGUFVerificationError: llama.cpp failed, or wrote a file that does not
        match the checkpoint; nothing is published then.
    """
    if not_main_process(model, options):
        return None
    if is_lora(options.get("save_method")):  # the adapter alone, as a GGUF LoRA file
        from fastsave.export.lora_gguf import save_lora_gguf

        if options.get("push_to_hub"):
            raise ValueError("push a GGUF LoRA file with push_to_hub_gguf(..., save_method='lora')")
        options = {k: v for k, v in options.items() if k != "save_method"}
        return [save_lora_gguf(model, save_directory, quantization_method, llama_cpp=llama_cpp, **options)]
    paths, _ = _export(
        model,
        save_directory,
        tokenizer,
        quantization_method,
        llama_cpp,
        first_conversion,
        imatrix_file,
        options,
    )
    return paths


def _export(
    model: nn.Module,
    save_directory: str | Path,
    tokenizer: Any,
    quantization_method: Any,
    llama_cpp: str | Path | None,
    first_conversion: str | None,
    imatrix_file: str | Path | None,
    options: dict[str, Any],
) -> tuple[list[str], str | None]:
    """The export behind both public functions; returns the GGUF paths and the hub URL when pushed."""
    from fastsave.inputs.live_model import LiveModelInput
    from fastsave.io.ownership import GGUF
    from fastsave.pipeline.preflight import Preflight
    from fastsave.pipeline.run import output_plan
    from fastsave.pipeline.write import write_merged_weights
    from fastsave.plan.dtype import output_dtype as resolve_output_dtype
    from fastsave.plan.walk import unwrap_peft

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from fastsave.inputs.sharded_model import is_sharded

    if is_sharded(model):
        raise ValueError(
            "save_pretrained_gguf does not run on a sharded (FSDP / ZeRO-3) model: save it with "
            "save_pretrained_merged on every rank, then convert that checkpoint on one process "
            "(llama.cpp's convert_hf_to_gguf.py)"
        )
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: a GGUF file carries the vocabulary")
    split_bytes = _gguf_shard_size(options.pop("gguf_shard_size", None))
    opts = parse_gguf_options(save_directory, **options)
    if imatrix_file is False:  # Unsloth's spelling of "none"
        imatrix_file = None
    if imatrix_file is not None and (isinstance(imatrix_file, bool) or not Path(imatrix_file).is_file()):
        raise ValueError(
            f"imatrix_file={imatrix_file!r} must be the path of an importance-matrix file: fastsave never "
            "downloads one (Unsloth's imatrix_file=True fetches it from the Hub)"
        )
    model_dtype = opts.dtype or resolve_output_dtype(unwrap_peft(model), None)
    unquantized = GGUF_TYPES[model_dtype]
    methods = normalize_methods(quantization_method, unquantized, imatrix=imatrix_file is not None)
    first = choose_first_conversion(methods, unquantized, first_conversion)
    if split_bytes and any(method not in FED_OUTTYPES for method in methods):
        raise ValueError(
            "gguf_shard_size splits the f32, f16, bf16 and q8_0 files llama.cpp's converter writes; the "
            f"llama-quantize types asked for ({', '.join(m for m in methods if m not in FED_OUTTYPES)}) are written "
            "whole here: split them with llama.cpp's gguf-split"
        )
    tools = find_llama_cpp(llama_cpp, need_quantize=any(m != first for m in methods))
    checkpoint_dtype = opts.dtype or (dtype_of_gguf_type(first) or model_dtype)
    n_weights = logical_parameter_count(model)
    gguf = load_gguf(tools)
    stem = gguf_stem(model)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # straight from the merge when this llama.cpp's converter can be fed and writes the first type itself
    why_not_fed = feed_unavailable_reason(tools) if first in FED_OUTTYPES else "llama-quantize reads a file"
    if why_not_fed is not None and first in FED_OUTTYPES:
        logger.info("fastsave: %s; converting from a temporary 16-bit checkpoint instead", why_not_fed)
    preflight = Preflight(opts, kind=GGUF)
    # the model's objects sit out collections while the merge streams (fastsave.collector)
    with older_objects_frozen(), preflight as work:
        sizes = check_export_space(
            n_weights,
            checkpoint_dtype.itemsize if why_not_fed is not None else 0,
            first,
            methods,
            work,
            opts.save_directory,
        )
        checkpoint = work / "checkpoint"
        checkpoint.mkdir()
        tick = time.perf_counter()
        # the same plan as every save, its tensors fed to the converter or written into the export's staging
        checkpoint_opts = _checkpoint_options(opts, checkpoint, checkpoint_dtype)
        save_input = LiveModelInput(model, tokenizer)
        plan = output_plan(save_input, checkpoint_opts)
        first_file = work / f"{stem}.{file_type_name(first)}.gguf"
        save_input.write_files(checkpoint, plan, checkpoint_opts, None)
        stage_added_tokens(checkpoint, tokenizer)  # where the converter reads a sentencepiece vocabulary's
        facts = facts_from_plan(plan, checkpoint)  # what the checkpoint holds, whichever route
        if why_not_fed is None:  # only config.json and the tokenizer on disk
            timings["merge and convert"] = convert_from_plan(
                tools, checkpoint, plan, first_file, first, split_bytes
            )
        else:
            write_merged_weights(plan, checkpoint, checkpoint_opts)
            timings["merge"] = time.perf_counter() - tick
            timings["convert"] = convert_checkpoint(tools, checkpoint, first_file, first, split_bytes)
        shutil.rmtree(checkpoint)  # the temporary 16-bit checkpoint goes before any quantize pass
        outputs: list[list[Path]] = []
        for method in methods:
            target = work / f"{stem}.{file_type_name(method)}.gguf"
            if method != first:
                timings[f"quantize {method}"] = quantize_gguf(
                    tools, first_file, target, method, Path(imatrix_file) if imatrix_file else None
                )
            outputs.append(split_parts(target) if split_bytes and not target.is_file() else [target])
        if first not in methods:
            first_file.unlink()
        checks = [verify_gguf(parts, facts, gguf) for parts in outputs]
        card = facts_from_model(
            model,
            "gguf",
            adapter_names=opts.adapter_names,
            base_weights=opts.base_weights,
            dtype=checkpoint_dtype,
            tags=opts.tags,
            datasets=opts.datasets,
            files=[(c.path.name, c.size_bytes, c.file_type) for c in checks],
        )
        place_model_card(render_model_card(card, opts.save_directory.name), work, opts.save_directory)
        preflight.pending.publish()
    paths = [opts.save_directory / check.path.name for check in checks]
    _log_summary(
        checks, paths, timings, time.perf_counter() - started, sizes, tools.root, why_not_fed is None
    )
    # every file written: the parts of a split model, in order
    paths = [opts.save_directory / part.name for parts in outputs for part in parts]
    url = None
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        url = upload_directory(opts)
    return [str(path) for path in paths], url


def _gguf_shard_size(value: Any) -> int:
    """``gguf_shard_size`` in bytes (0: one file).

    Raises:
        ValueError: not a size.
    """
    if value in (None, 0, "0"):
        return 0
    from fastsave.options import parse_shard_size

    return parse_shard_size(value)


def _log_summary(checks, paths, timings, seconds, sizes, root, fed: bool) -> None:
    lines = [
        f"fastsave: GGUF export in {seconds:.1f}s ("
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + ")"
    ]
    for check, path in zip(checks, paths, strict=True):
        lines.append(
            f"  {path}  {check.size_bytes / 1e6:.1f} MB, {check.file_type}, {check.architecture}, "
            f"{check.tensor_count} tensors ({check.shapes_checked} shapes checked against the checkpoint), "
            f"vocab {check.vocab_size}"
        )
        lines += [f"    note: {note}" for note in check.notes]
    if fed:
        lines.append(f"  converted with {root}, straight from the merge: no 16-bit checkpoint was written")
    else:
        lines.append(
            f"  converted with {root}; the temporary 16-bit checkpoint ({sizes['checkpoint'] / 1e6:.1f} MB) was removed"
        )
    logger.info("\n".join(lines))


@shows_its_lines
def push_to_hub_gguf(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    quantization_method: Any = DEFAULT_METHOD,
    *,
    use_temp_dir: bool | None = None,
    **options: Any,
) -> str | None:
    """Export to GGUF (as :func:`save_pretrained_gguf`), then upload the files to the hub as ``repo_id``.

    As in Unsloth, ``use_temp_dir`` None or True exports into a temporary directory that is removed
    after the upload; False keeps the files in a local folder named after the repo. Returns the URL
    (of the pull request with ``create_pr=True``); None with ``is_main_process=False``.
    """
    if not_main_process(model, options):
        return None
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a hub repo id such as 'user/model-gguf', got {repo_id!r}")
    if is_lora(options.get("save_method")):  # the adapter alone, as a GGUF LoRA file
        from fastsave.export.lora_gguf import push_lora_gguf

        for unused in ("first_conversion", "imatrix_file", "save_method"):
            options.pop(unused, None)
        return push_lora_gguf(model, repo_id, quantization_method, use_temp_dir=use_temp_dir, **options)
    llama_cpp = options.pop("llama_cpp", None)
    first = options.pop("first_conversion", None)
    imatrix_file = options.pop("imatrix_file", None)
    options = {**options, "push_to_hub": True, "repo_id": options.get("repo_id") or repo_id}
    if use_temp_dir is False:
        _, url = _export(
            model, Path(repo_id).name, tokenizer, quantization_method, llama_cpp, first, imatrix_file, options
        )
        return url or ""
    with tempfile.TemporaryDirectory(prefix="fastsave-gguf-push-") as temporary:
        local = Path(temporary) / Path(repo_id).name
        _, url = _export(
            model, local, tokenizer, quantization_method, llama_cpp, first, imatrix_file, options
        )
    return url or ""
