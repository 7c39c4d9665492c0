"""``state_dict=``: tensors the caller hands over, written instead of the ones the plan would compute.

transformers' ``save_pretrained(state_dict=...)`` writes the given tensors instead of the model's,
and Unsloth passes the keyword through. For a merged save the plan is still built from the model
(names, shapes, shards, LoRA census and checks all stay as they are); then every planned tensor
whose name appears in the given state dict is produced from it instead: the given tensor, cast once
to the plan's dtype. Names are the saved checkpoint's names (``model.layers.0.self_attn.q_proj.weight``);
a peft model's ``base_model.model.`` prefix is accepted and stripped.

Refused before anything is written: a given tensor whose shape differs from the planned one, a
floating-point tensor planned where an integer one is given (or the reverse), NaN/Inf, and a name
the checkpoint does not contain (a quantized, LoRA or ``base_layer`` tensor of a peft state dict,
a typo), since silently dropping a tensor the caller asked to save is worse than saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import torch

from fastsave.errors import PlanError
from fastsave.merge.dispatch import copy_producer
from fastsave.plan.items import Plan
from fastsave.sources.dense import DenseSource

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def _by_checkpoint_name(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensors[name.removeprefix(_PEFT_PREFIX)] = tensor
    return tensors


def substitute_given_tensors(plan: Plan, state_dict: Mapping[str, torch.Tensor] | None) -> Plan:
    """``plan`` with every tensor named in ``state_dict`` produced from it (the plan itself when None).

    Raises:
        PlanError: a name the plan does not hold, a shape or kind mismatch; nothing was written.
    """
    if state_dict is None:
        return plan
    given = _by_checkpoint_name(state_dict)
    planned_names = {planned.name for planned in plan.items}
    unknown = sorted(set(given) - planned_names)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise PlanError(
            f"state_dict holds {len(unknown)} tensor(s) that the saved checkpoint does not contain: {shown}. "
            "A merged save takes tensors under the checkpoint's own names (for example "
            f"{sorted(planned_names)[0]!r}); LoRA, base_layer and quantization tensors of a peft state "
            "dict have no place in it. Nothing was written."
        )
    tensors = []
    taken = 0
    for planned in plan.items:
        tensor = given.get(planned.name)
        if tensor is None:
            tensors.append(planned)
            continue
        if tuple(tensor.shape) != planned.shape:
            raise PlanError(
                f"state_dict tensor {planned.name!r} has shape {tuple(tensor.shape)}, the checkpoint's is "
                f"{planned.shape}. Nothing was written."
            )
        planned_floating = planned.dtype.is_floating_point
        if tensor.is_floating_point() != planned_floating:
            raise PlanError(
                f"state_dict tensor {planned.name!r} is {tensor.dtype}, the checkpoint holds {planned.dtype} "
                "there. Nothing was written."
            )
        out_dtype = planned.dtype if planned_floating else tensor.dtype
        # the given tensor is a source like any other: one rounding to the plan's dtype, checked
        production = copy_producer(DenseSource(tensor.detach().to("cpu")), out_dtype, planned.name)
        tensors.append(
            replace(
                planned,
                dtype=out_dtype,
                produce=production.produce,
                stream=production.stream,
                working_bytes=production.working_bytes,
                source_kind="the given state_dict",
                participate=None,  # nothing to gather: the tensor is given
                group=None,
            )
        )
        taken += 1
    logger.info("fastsave: %d tensor(s) taken from the given state_dict instead of the model", taken)
    return replace(plan, items=tensors)
