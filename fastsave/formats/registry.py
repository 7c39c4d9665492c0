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
        quantization_config: ``(save_input, plan) -> config``: the quantization_config config.json
            gets (None: the checkpoint is plain 16-bit and config.json has none).
        summary: the lines this format adds to the save's closing summary.
    """

    save_method: str
    transform: Callable[[Any, Plan], Plan]
    quantization_config: Callable[[Any, Plan], Any] | None = None
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


def quantization_config_of(save_method: str, save_input: Any, plan: Plan) -> Any:
    """The quantization_config config.json gets for a save with ``save_method`` (None: none)."""
    output_format = _FORMATS.get(save_method)
    if output_format is None or output_format.quantization_config is None:
        return None
    return output_format.quantization_config(save_input, plan)


def format_of(save_method: str) -> OutputFormat | None:
    """The output format of ``save_method``; None for "merged_16bit" (the plan as it is) and "lora"."""
    return _FORMATS.get(save_method)
