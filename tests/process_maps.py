"""The process's memory mappings as the tests read them (/proc/self/maps)."""

from __future__ import annotations


def mapping_at(address: int) -> tuple[int, int, str] | None:
    """(start, end, line) of the /proc/self/maps mapping that holds ``address``; None if none does."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return start, end, line
    return None
