"""``fastsave merge ADAPTER_DIR OUT_DIR``: the command-line front of fastsave.api.merge_adapter.

Started by torchrun (``torchrun --nproc-per-node N -m fastsave merge ...``, or across machines
that share the output's filesystem), every rank runs this command: it joins the process group
torchrun describes (gloo: the merge runs on CPUs) and the ranks share the merge, each writing the
shards assigned to it; the output is byte for byte the single-process one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastsave.cli.quiet import quiet_libraries
from fastsave.compressed_schemes import NEEDS_CALIBRATION
from fastsave.save_methods import COMMAND_LINE_SAVE_METHODS


def _errors() -> tuple[type[BaseException], ...]:
    """The errors the command reports as a message (imported when a merge runs, not to parse arguments)."""
    from fastsave.errors import SaveInProgressError, VerifyError
    from fastsave.parallel.ranks import RankFailedError, RanksDisagreeError
    from fastsave.parallel.team import CollectiveCallError, RankLostError

    return (
        ValueError,
        OSError,  # DiskSpaceError is an OSError
        SaveInProgressError,
        VerifyError,
        RankFailedError,
        RankLostError,
        RanksDisagreeError,
        CollectiveCallError,
    )


def launched_on_ranks() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group() -> Iterator[int]:
    """Join the process group the launcher describes (gloo), for the block; yields this rank.

    A group that is already initialized (the caller's) is used and left as it is.
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        # torch._dynamo, first imported after a group exists (the merge imports bitsandbytes, which
        # imports it), keeps 10 references to the default group (torch 2.13): destroy_process_group
        # then leaves gloo's threads running, and the interpreter's exit aborted a rank in about 1 of
        # 50 torchrun merges (`terminate called without an active exception`, after the checkpoint
        # was published). Imported before the group is made, it keeps none.
        import torch._dynamo  # noqa: F401

        dist.init_process_group("gloo")
    logger = logging.getLogger(__name__)
    level = logger.level
    if dist.get_rank() != 0:
        logger.setLevel(logging.WARNING)  # rank 0 reports the save; the others only their problems
    try:
        yield dist.get_rank()
    finally:
        logger.setLevel(level)
        if created:
            dist.destroy_process_group()


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``merge`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``).

    The parser's default ``func`` is :func:`run_merge`.
    """
    parser = subparsers.add_parser(
        "merge",
        help="merge a saved LoRA adapter into its 16-bit base on disk (no 4-bit model loaded)",
        description=(
            "Merge a saved peft LoRA adapter (adapter_config.json + adapter_model.safetensors) into its "
            "16-bit base checkpoint, streaming one tensor at a time. By default each base weight a 4-bit "
            "load would quantize is quantized and dequantized again (NF4, double quant, blocksize 64) "
            "so the result computes what the trained QLoRA model computed."
        ),
    )
    parser.add_argument(
        "adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors"
    )
    parser.add_argument("out_dir", help="output directory (written in one step when complete)")
    parser.add_argument(
        "--base",
        default=None,
        help="16-bit base checkpoint: a local directory or a repo id already in the local HF cache "
        "(default: the adapter's base_model_name_or_path); never downloaded",
    )
    parser.add_argument(
        "--save-method",
        # the calibrated schemes are offered so that the save refuses them saying what they need
        choices=(*COMMAND_LINE_SAVE_METHODS, *NEEDS_CALIBRATION),
        default="merged_16bit",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="like transformers: 500MB, 5GB, 2GiB (default 5GB)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="output dtype (default: the base checkpoint's 16-bit dtype, else bfloat16)",
    )
    parser.add_argument("--base-weights", choices=("dequantized", "original"), default="dequantized")
    parser.add_argument(
        "--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit type training used"
    )
    parser.add_argument(
        "--blocksize",
        type=int,
        default=64,
        choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),
        help="4-bit blocksize training used (default 64)",
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="training did not use double quantization (bnb_4bit_use_double_quant=False)",
    )
    parser.add_argument(
        "--maximum-memory-usage", type=float, default=0.75, help="fraction of RAM (default 0.75)"
    )
    parser.add_argument("--temporary-location", default=None, help="directory for staging files")
    parser.add_argument(
        "--replace-in-place",
        action="store_true",
        help="when the disk cannot hold OUT_DIR's previous checkpoint and the new one together, delete "
        "the previous one first (without this, such a save is refused)",
    )
    parser.add_argument(
        "--gguf",
        choices=("f32", "f16", "bf16", "q8_0"),
        default=None,
        help="with --save-method lora: write the adapter as a GGUF LoRA file of this type with llama.cpp's "
        "convert_lora_to_gguf.py (beside the base's GGUF, llama.cpp loads it with --lora)",
    )
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp checkout (for --gguf)")
    parser.set_defaults(func=run_merge)
    return parser


def run_merge(args: argparse.Namespace) -> int:
    """Run ``fastsave merge`` with parsed arguments; 0 on success, 1 (and a message on stderr) on error.

    Under torchrun every rank runs it and the ranks share the work (see the module docstring).
    """
    if not launched_on_ranks():
        return _merge(args, distributed=False, who="")
    with process_group() as rank:
        return _merge(args, distributed=True, who=f" (rank {rank})")


def _merge(args: argparse.Namespace, distributed: bool, who: str) -> int:
    with quiet_libraries():  # for the whole run: other libraries speak on their lazy imports too
        if args.gguf is not None:
            return _lora_gguf(args)
        return _merge_quietly(args, distributed, who)


def _merge_quietly(args: argparse.Namespace, distributed: bool, who: str) -> int:
    from fastsave.api import merge_adapter
    from fastsave.sources.settings_4bit import Quant4bitSettings

    try:
        merge_adapter(
            args.adapter_dir,
            args.out_dir,
            base=args.base,
            save_method=args.save_method,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            base_weights=args.base_weights,
            quant=Quant4bitSettings(args.quant_type, args.blocksize, args.double_quant),
            maximum_memory_usage=args.maximum_memory_usage,
            temporary_location=args.temporary_location,
            replace_in_place=args.replace_in_place,
            distributed=distributed,
        )
    except _errors() as error:
        print(f"fastsave merge{who}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _lora_gguf(args: argparse.Namespace) -> int:
    """``--save-method lora --gguf TYPE``: the saved adapter as a GGUF LoRA file."""
    from fastsave.export.lora_gguf import save_saved_lora_gguf

    try:
        if args.save_method != "lora":
            raise ValueError(
                "--gguf writes a GGUF LoRA adapter and needs --save-method lora (to export a merged model to "
                "GGUF, merge it and convert the checkpoint with llama.cpp's convert_hf_to_gguf.py)"
            )
        save_saved_lora_gguf(
            args.adapter_dir,
            args.out_dir,
            args.gguf,
            base=args.base,
            llama_cpp=args.llama_cpp,
            temporary_location=args.temporary_location,
        )
    except _errors() as error:
        print(f"fastsave merge: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastsave.cli.merge ADAPTER_DIR OUT_DIR ...``: the merge command on its own."""
    parser = argparse.ArgumentParser(prog="fastsave")
    add_merge_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
