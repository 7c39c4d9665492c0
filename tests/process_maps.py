"""The process's memory mappings as the tests read them (/proc/self/maps, /proc/self/status)."""

from __future__ import annotations


def mapping_at(address: int) -> tuple[int, int, str] | None:
    """(start, end, line) of the /proc/self/maps mapping that holds ``address``; None if none does."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return start, end, line
    return None


def vm_data() -> int:
    """The process's mapped data in bytes (VmData: what RLIMIT_DATA limits)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
