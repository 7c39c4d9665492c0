"""The VRAM bound of a save: how much device memory the merge work on one GPU may hold at once.

A model trained on a GPU is saved from there: its 4-bit weights are dequantized and merged on the
device, and only the output dtype crosses to the host. What that work holds on the device is
bounded by ``maximum_memory_usage`` times the VRAM that was free when the save first touched the
device (``torch.cuda.mem_get_info``): the model itself, the optimizer state and the caching
allocator's reserve are already taken and are not the save's to use. A weight is merged on the
device in row blocks sized to that allowance (fastsave.merge.device_rows); a merge that needs the
whole weight on the device runs there only when its working set fits the allowance, and is
otherwise merged block by block on the host.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MIB = 2**20
# Output bytes of one device block when VRAM is plentiful: large enough that a kernel launch and a
# copy's fixed cost are small against it (16 MiB is 8M bf16 values: ~0.1 ms of an H100's kernel
# time, ~1 ms of a PCIe copy), small enough that a few of them in flight are negligible.
DEVICE_BLOCK_BYTES = 16 * MIB
# Never smaller (a block is at least one row anyway): below this a launch costs more than its work.
MIN_DEVICE_BLOCK_BYTES = 64 * 1024
# Device blocks in flight at once: the one being computed and the ones being copied to the host.
BLOCKS_IN_FLIGHT = 3


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: what the driver reports free), or None where that is not a GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


class DeviceBudget:
    """What the save's merge work may hold on each GPU: ``fraction`` of the VRAM free when it started.

    The free memory of a device is read the first time the save asks about it (the save's start,
    for every device that holds a weight) and kept: the allowance does not shrink as the save's own
    blocks come and go.
    """

    def __init__(self, fraction: float, host_block_bytes: int = DEVICE_BLOCK_BYTES) -> None:
        self.fraction = fraction
        # device blocks land in host memory too (pinned copies): their size also follows the RAM budget
        self.host_block_bytes = host_block_bytes
        self._allowance: dict[tuple[str, int | None], int | None] = {}

    def allowance(self, device: torch.device) -> int | None:
        """Bytes the merge work may hold on ``device``; None where no bound applies (the CPU)."""
        key = (device.type, device.index)
        if key not in self._allowance:
            free = free_device_memory(device)
            self._allowance[key] = None if free is None else int(free * self.fraction)
            if free is not None:
                logger.info(
                    "fastsave: %s has %.2f GB free; the merge may hold %.2f GB of it",
                    device,
                    free / 1e9,
                    self._allowance[key] / 1e9,
                )
        return self._allowance[key]

    def block_bytes(self, device: torch.device) -> int:
        """Output bytes of one device block: :data:`BLOCKS_IN_FLIGHT` of them (and the kernels'
        inputs) fit the allowance, and so do their pinned copies on the host."""
        allowance = self.allowance(device)
        wanted = min(DEVICE_BLOCK_BYTES, self.host_block_bytes)
        if allowance is not None:
            wanted = min(wanted, allowance // (2 * BLOCKS_IN_FLIGHT))
        return max(MIN_DEVICE_BLOCK_BYTES, wanted)

    def fits_whole(self, device: torch.device, nbytes: int) -> bool:
        """Whether a merge holding ``nbytes`` on ``device`` at once may run there."""
        allowance = self.allowance(device)
        return allowance is None or nbytes <= allowance
