"""DeepSpeed ZeRO stage 3: parameters partitioned (``ds_*`` attributes), gathered with
``deepspeed.zero.GatheredParameters``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fastsave.parallel.engines.base import Engine, ModuleEntry, own_parameters


def is_partitioned(parameter: torch.Tensor) -> bool:
    """ZeRO-3 marks every parameter it partitions with ds_id/ds_status; ZeRO-1/2 leave them whole."""
    return hasattr(parameter, "ds_id") and hasattr(parameter, "ds_status")


class Zero3(Engine):
    """Each parameter partitioned over the ranks; its full shape is ``ds_shape``."""

    name = "zero3"

    @classmethod
    def shards(cls, modules: Sequence[nn.Module]) -> bool:
        return any(is_partitioned(p) for p in own_parameters(modules))

    def full_shape(self, parameter: torch.Tensor) -> tuple[int, ...]:
        return tuple(parameter.ds_shape) if is_partitioned(parameter) else tuple(parameter.shape)

    @contextmanager
    def gathered(self, entries: Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        import deepspeed

        parameters = [getattr(e.module, p) for e in entries for p in e.parameters]
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            out = {e.full_name(p): getattr(e.module, p).data for e in entries for p in e.parameters}
            try:
                yield out
            finally:
                out.clear()
