"""A weight accelerate offloaded to the CPU or disk (``device_map="auto"`` on a small GPU).

accelerate leaves such a parameter on the meta device and keeps its values in the module's
AlignDevicesHook ``weights_map`` (CPU tensors, or a lazy loader over files in the offload folder),
moving them in only around a forward pass. fastsave reads the values from there, one tensor at a
time, without running the module.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsave.sources.dense import DenseSource


def _hooks(module: nn.Module) -> list[object]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def offloaded_value(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The values of ``module.<attr>`` from accelerate's weights map, or None when it holds none."""
    for hook in _hooks(module):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None:
            continue
        try:
            value = weights_map[attr]
        except KeyError:
            continue
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return value
    return None


class OffloadedSource(DenseSource):
    """A tensor held in accelerate's weights map; read from there (disk reads happen on each access)."""

    kind = "offloaded"

    def __init__(self, module: nn.Module, attr: str, like: torch.Tensor) -> None:
        value = offloaded_value(module, attr)
        if value is None:
            raise LookupError(attr)
        self.module = module
        self.attr = attr
        super().__init__(value)
        # A disk-backed weights map loads on access: do not keep the value alive past planning.
        self.tensor = None
        self.shape = tuple(like.shape) if like.shape == value.shape else tuple(value.shape)

    def _value(self) -> torch.Tensor:
        value = offloaded_value(self.module, self.attr)
        if value is None:  # pragma: no cover - the weights map changed under us
            raise RuntimeError(f"accelerate's weights map no longer holds {self.attr!r}")
        return value

    def float32(self) -> torch.Tensor:
        """The offloaded values as float32."""
        return self._value().detach().to(torch.float32, copy=True)

    def as_stored(self) -> torch.Tensor:
        """The offloaded values."""
        return self._value().detach()

    def row_reader(self) -> None:
        """Whole tensors only: a disk-backed map reads the whole tensor on every access."""
        return None
