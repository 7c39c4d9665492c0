"""The ``fastsave`` command: ``fastsave demo [OUT]``, ``fastsave merge ADAPTER_DIR OUT_DIR``, ``fastsave verify DIR``."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastsave`` command."""
    from fastsave._version import __version__
    from fastsave.cli.merge import add_merge_parser

    parser = argparse.ArgumentParser(
        prog="fastsave", description="Save QLoRA models merged, exactly and in bounded memory."
    )
    parser.add_argument("--version", action="version", version=f"fastsave {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole job end to end on a tiny model built locally")
    demo.add_argument("output_dir", nargs="?", default=None, help="where to write the merged checkpoint")
    demo.add_argument("--steps", type=int, default=6, help="training steps before saving (default 6)")
    add_merge_parser(commands)
    verify = commands.add_parser(
        "verify",
        help="re-read a saved checkpoint: shard headers, index, sizes (and the data checksums with --checksums)",
    )
    verify.add_argument("directory", help="a directory written by save_pretrained_merged or fastsave merge")
    verify.add_argument(
        "--checksums",
        action="store_true",
        help="also re-read every shard's data against the checksums recorded when it was written",
    )
    verify.set_defaults(func=run_verify)
    return parser


def run_verify(args: argparse.Namespace) -> int:
    """``fastsave verify DIR [--checksums]``: print what was checked; 1 when there is a problem."""
    from fastsave.io.verify import verify_checkpoint

    report = verify_checkpoint(args.directory, checksums=args.checksums)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastsave`` console script; returns the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fastsave never downloads behind the user's back
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from fastsave.cli.quiet import quiet_libraries

        # the demo's own loads and saves of the tiny model it builds: no bars of transformers' for them
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            with quiet_libraries():
                from fastsave.demo import format_report, run_demo

                report = run_demo(args.output_dir, train_steps=args.steps)
        except (RuntimeError, ValueError) as error:
            print(f"fastsave demo: FAILED: {error}", file=sys.stderr)
            return 1
        print(format_report(report))
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
