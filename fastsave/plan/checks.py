"""The end-of-plan safety net, run before anything is written, in linear time.

A merged checkpoint must hold unique names, no quantized or unmerged-adapter tensor, and exactly
one merged weight for every module that holds LoRA weights, counted independently of the walk
that built the plan: a partial merge is never saved.
"""

from __future__ import annotations

import re
from collections import Counter

from fastsave.errors import PlanError
from fastsave.plan.items import Plan

# Names that only a quantized or unmerged state dict contains; a merged save must hold none.
FORBIDDEN_NAME = re.compile(
    r"(^|\.)(base_layer|lora_[A-Za-z_]+|absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_format|W_q)(\.|$)"
    r"|quant_state|^base_model\.model\."
)


def check_unique_names(plan: Plan) -> None:
    """Raise PlanError when two items share a name."""
    duplicates = sorted(name for name, count in Counter(i.name for i in plan.items).items() if count > 1)
    if duplicates:
        raise PlanError(f"the plan names these tensors twice: {duplicates[:8]}")


def check_plan(plan: Plan) -> None:
    """Unique names, no quantized/LoRA tensor, every LoRA module merged once (on the 16-bit plan).

    Raises:
        PlanError: the plan would write a checkpoint that is not a plain merged model.
    """
    check_unique_names(plan)
    bad = [i.name for i in plan.items if FORBIDDEN_NAME.search(i.name)]
    if bad:
        raise PlanError(
            f"refusing to write a 'merged' checkpoint that holds quantized or LoRA tensors: {bad[:8]}"
            + (" ..." if len(bad) > 8 else "")
        )
    merged = Counter(plan.merged_modules)
    census = Counter(plan.census)
    if merged != census or any(count > 1 for count in merged.values()):
        missing = sorted(set(census) - set(merged))
        extra = sorted(set(merged) - set(census))
        twice = sorted(name for name, count in merged.items() if count > 1)
        raise PlanError(
            f"{sum(merged.values())} merged modules planned for {len(census)} LoRA modules; a partial merge is "
            f"never saved. Not merged: {missing[:8]}; unexpected: {extra[:8]}; merged twice: {twice[:8]}"
        )
