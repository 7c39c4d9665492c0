"""The interface every save input offers the one save path (fastsave.pipeline.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.plan.items import Plan


class SaveInput(Protocol):
    """A model to save, whatever it is made of.

    Attributes:
        root: the model's module tree (transformers names), for the checkpoint layout step.
        model: the peft model (its adapter configs describe the save in the model card), or None.
        team: the ranks that save it together (fastsave.parallel.team); None: one process.
    """

    root: nn.Module
    model: nn.Module | None
    team: SaveTeam | None

    def merged_plan(self, opts: SaveOptions) -> Plan:
        """The checked 16-bit merged plan under the model's names (before any output-format step)."""
        ...

    def quantization_config(self, plan: Plan) -> Any:
        """The quantization_config a merged_4bit_forced checkpoint carries (the training settings)."""
        ...

    def write_files(self, directory: Path, plan: Plan, opts: SaveOptions, quantization: Any) -> list[str]:
        """config.json (with ``quantization`` as its quantization_config, or none), generation_config.json
        and tokenizer files beside the weights; the tokenizer files written."""
        ...

    def write_adapter(self, directory: Path, opts: SaveOptions) -> list[str]:
        """save_method="lora": the adapter files and tokenizer; returns the files written."""
        ...

    def describe(self, plan: Plan) -> str:
        """What the adapters were merged into, for the save log."""
        ...
