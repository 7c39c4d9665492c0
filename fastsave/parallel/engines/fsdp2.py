"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors, gathered one by one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fastsave.parallel.engines.base import Engine, ModuleEntry, own_parameters


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: no FSDP2 either
        return None
    return DTensor


class Fsdp2(Engine):
    """Each parameter a DTensor; ``full_tensor()`` gathers it (rows alone where it is row-sharded)."""

    name = "fsdp2"

    @classmethod
    def shards(cls, modules: Sequence[nn.Module]) -> bool:
        dtensor = _dtensor_class()
        return dtensor is not None and any(isinstance(p, dtensor) for p in own_parameters(modules))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # After a forward, FSDP2 leaves the root (reshard_after_forward=False) unsharded, with plain
        # tensors registered; its own state_dict reshards first, and so do we: every parameter is
        # then a DTensor and gathering it is always the same collective on every rank.
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def gathered(self, entries: Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        dtensor = _dtensor_class()
        out: dict[str, torch.Tensor] = {}
        for entry in entries:
            for name in entry.parameters:
                parameter = getattr(entry.module, name)
                if isinstance(parameter, dtensor):
                    mesh_device = parameter.device_mesh.device_type
                    if parameter.to_local().device.type != mesh_device:
                        # CPU-offloaded shards: the collective runs on the mesh's device (nccl).
                        parameter = parameter.to(mesh_device)
                    out[entry.full_name(name)] = parameter.full_tensor().detach()
                else:  # not managed by fully_shard: whole on every rank already
                    out[entry.full_name(name)] = parameter.detach()
        try:
            yield out
        finally:
            out.clear()

    def row_window(self, value: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Under row sharding (``Shard(0)`` on a one-dimensional mesh) only the ranks that hold the
        rows send them, one broadcast each: memory is the window, not the parameter."""
        if not isinstance(value, _dtensor_class()) or not _row_sharded(value):
            return None
        return _broadcast_rows(value, start, stop)


def _row_sharded(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import Shard

    return value.device_mesh.ndim == 1 and len(value.placements) == 1 and value.placements[0] == Shard(0)


def _broadcast_rows(value: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a row-sharded DTensor, sent by the ranks that hold them."""
    import torch.distributed as dist

    mesh = value.device_mesh
    group = mesh.get_group()
    world = mesh.size()
    rows = value.shape[0]
    chunk = -(-rows // world)  # DTensor's Shard(0) splits like torch.chunk: ceil-sized chunks
    local = value.to_local()
    me = mesh.get_local_rank()
    device = local.device if local.device.type == mesh.device_type else torch.device(mesh.device_type)
    window = torch.empty((stop - start, *value.shape[1:]), dtype=value.dtype, device=device)
    for holder in range(world):
        first, last = max(start, holder * chunk), min(stop, (holder + 1) * chunk, rows)
        if first >= last:
            continue
        piece = window[first - start : last - start]
        if holder == me:
            piece.copy_(local[first - holder * chunk : last - holder * chunk])
        if world > 1:  # a dim-0 slice of a fresh tensor is contiguous: received in place
            dist.broadcast(piece, src=dist.get_global_rank(group, holder), group=group)
    return window
