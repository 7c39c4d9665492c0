"""The output formats registry: what a format declares, and which save_method writes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastsave.options import add_save_method, remove_save_method
from fastsave.plan.items import Plan


@dataclass(frozen=True)
class OutputFormat:
    """One output format: a ``save_method`` whose checkpoint is a transformation of the merged plan.

    Attributes:
        save_method: the name users pass.
        transform: ``(save_input, plan) -> plan``; may refuse (before anything is written).
        keeps_quantization_config: config.json keeps (or gets) the model's quantization_config.
        summary: the lines this format adds to the save's closing summary.
    """

    save_method: str
    transform: Callable[[Any, Plan], Plan]
    keeps_quantization_config: bool = False
    summary: Callable[[Plan], list[str]] = lambda plan: []


_FORMATS: dict[str, OutputFormat] = {}


def register(output_format: OutputFormat) -> None:
    """Make ``output_format.save_method`` a save method that writes this format."""
    _FORMATS[output_format.save_method] = output_format
    add_save_method(output_format.save_method)


def unregister(output_format: OutputFormat) -> None:
    """Undo :func:`register` (tests register toy formats)."""
    del _FORMATS[output_format.save_method]
    remove_save_method(output_format.save_method)


def format_of(save_method: str) -> OutputFormat | None:
    """The output format of ``save_method``; None for "merged_16bit" (the plan as it is) and "lora"."""
    return _FORMATS.get(save_method)
