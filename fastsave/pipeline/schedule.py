"""Which planned tensors one rank produces, in plan order (every rank walks all of them).

A solo save produces everything. In a collective save each rank produces the tensors of the
shards it writes, and for the others enters only the collectives that producing them involves
(a sharded model's gathers), so that every rank enters the same collectives in the same order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fastsave.io.shards import Shard
from fastsave.plan.items import Plan, PlanItem, SharedProducer


class Action(enum.Enum):
    """What one rank does with one planned tensor."""

    PRODUCE = "produce"  # compute it and hand its pieces to the writer
    # only enter the collectives producing it involves: a plain item's (item.participate), or a
    # group's no part of which this rank writes (its collectives once, at its first part)
    COLLECTIVES_ONLY = "collectives only"
    SKIP = "skip"  # nothing: another rank writes it and producing it involves no collective here


@dataclass
class Step:
    """One planned tensor in the producer's schedule; ``agree``: the ranks meet after it (a shard ends)."""

    item: PlanItem
    action: Action
    agree: bool = False


def schedule(plan: Plan, shards: list[Shard], owners: list[int], rank: int) -> list[Step]:
    """What ``rank`` does with each planned tensor, in plan order (every rank walks all of them).

    A rank produces the tensors of the shards it owns. For the others it enters only the
    collectives their production involves (a sharded model's gathers), so that every rank enters the
    same collectives in the same order. Parts made together (a :class:`SharedProducer` group) are
    made by every rank that writes one of them, which keeps only those; a rank that writes none
    takes part in the group's collectives once, at its first part.
    """
    owner_of = {t.name: owners[i] for i, shard in enumerate(shards) for t in shard.tensors}
    last_of_shard = {shard.tensors[-1].name for shard in shards if shard.tensors}
    groups: dict[int, SharedProducer] = {}
    owned_parts: dict[int, set[str]] = {}
    for item in plan.items:
        if item.group is not None:
            groups[id(item.group)] = item.group
            parts = owned_parts.setdefault(id(item.group), set())
            if owner_of[item.name] == rank:
                parts.add(item.name)
    for key, group in groups.items():
        if owned_parts[key]:
            group.keep(owned_parts[key])
    steps: list[Step] = []
    seen: set[int] = set()
    for item in plan.items:
        mine = owner_of[item.name] == rank
        if item.group is None:
            action = (
                Action.PRODUCE if mine else (Action.COLLECTIVES_ONLY if item.participate else Action.SKIP)
            )
        elif mine:
            action = Action.PRODUCE
        elif owned_parts[id(item.group)] or id(item.group) in seen:
            action = Action.SKIP
        else:
            action = Action.COLLECTIVES_ONLY
        if item.group is not None:
            seen.add(id(item.group))
        steps.append(Step(item, action, item.name in last_of_shard))
    return steps
