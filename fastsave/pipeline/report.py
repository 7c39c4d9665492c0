"""What a save did, gathered as it runs, and the summary the log shows at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastsave.formats import format_of
from fastsave.memory import peak_rss
from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.plan.items import Plan

logger = logging.getLogger(__name__)


@dataclass
class SaveReport:
    """Filled in by :func:`fastsave.pipeline.run.run_save` on the rank that publishes."""

    plan: Plan | None = None  # merged saves
    shards: list[str] = field(default_factory=list)
    merged_into: str = ""  # what the LoRA modules were merged into (the input's words)
    tokenizer_files: list[str] = field(default_factory=list)
    switch: str = ""  # how the staged files were switched in


def log_summary(opts: SaveOptions, report: SaveReport, seconds: float, team: SaveTeam) -> None:
    """The save's closing lines: what was written where, how it was merged, the peak memory."""
    plan = report.plan
    ranks = f" by {team.world} ranks" if team.collective else ""
    lines = [f"fastsave: saved {opts.save_method} to {opts.save_directory}{ranks} in {seconds:.1f}s"]
    if plan is not None:
        output_format = format_of(opts.save_method)
        dtype = str(plan.dtype).removeprefix("torch.")
        stored = f"as {dtype}" if output_format is None else f"({dtype} where not quantized)"
        lines.append(
            f"  merged {len(plan.merged_modules)} LoRA modules into {report.merged_into}; "
            f"{len(plan.items)} tensors, {plan.total_bytes / 1e9:.2f} GB {stored} in {len(report.shards)} shard(s)"
        )
        if output_format is not None:
            lines.extend(output_format.summary(plan))
        if plan.untied_embeddings:
            lines.append(
                "  the adapter changed one of the tied embeddings: both written, tie_word_embeddings=false"
            )
    if report.tokenizer_files:
        lines.append(f"  tokenizer files: {', '.join(report.tokenizer_files)}")
    elif opts.save_method != "lora":
        lines.append("  no tokenizer given: pass one to save its files beside the model")
    if report.switch:
        lines.append(f"  {report.switch}")
    lines.append(f"  peak RSS {peak_rss() / 2**30:.2f} GiB")
    logger.info("\n".join(lines))
