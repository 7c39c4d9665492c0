"""The memory budget: how much the save may hold in flight, from the process's RSS and system RAM."""

from __future__ import annotations

import logging
import resource
import sys

import psutil

logger = logging.getLogger("fastsave")


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryBudget:
    """What the save may hold beyond what the process already holds.

    ``fraction`` of system RAM is the ceiling for the whole process. The in-flight allowance is
    what is left under it, never less than one tensor: a budget already exceeded is not an error,
    the save then keeps the smallest working set (one tensor in flight) and says so.
    """

    def __init__(self, fraction: float, largest_tensor_bytes: int) -> None:
        self.fraction = fraction
        self.limit = int(psutil.virtual_memory().total * fraction)
        self.largest = largest_tensor_bytes
        # A merge holds the float32 working copy (4 bytes an element) and the rounded output.
        headroom = self.limit - current_rss()
        self.minimal = headroom < 3 * largest_tensor_bytes
        self.in_flight_bytes = max(largest_tensor_bytes, headroom // 3)
        if self.minimal:
            logger.warning(
                "fastsave: maximum_memory_usage=%.2f allows %.1f GB but the process already holds %.1f GB; "
                "keeping the smallest working set (one tensor in flight)",
                fraction,
                self.limit / 1e9,
                current_rss() / 1e9,
            )

    def prefetch_depth(self) -> int:
        """How many produced tensors may wait for the writer at once."""
        if self.minimal:
            return 1
        return int(max(1, min(8, self.in_flight_bytes // max(1, self.largest))))
