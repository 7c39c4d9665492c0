"""fastsave.mappings: memory in mappings of its own, in huge pages where the kernel gives them.

What matters: a buffer is a mapping of its own (outside malloc's heap) that goes with its last
view; a buffer of at least a huge page starts at a huge-page boundary and maps only its own pages
(RLIMIT_DATA counts mapped bytes, so room to spare would count against a memory cap), advised for
huge pages; and where that cannot be had, it is an ordinary mapping, never an error.
"""

from __future__ import annotations

import gc
import mmap

import pytest
import torch
from process_maps import mapping_at, vm_data

from fastsave import mappings
from fastsave.mappings import mapped_buffer, mapped_memory

HUGE = 2 << 20  # the alignment asked for below, whatever this machine's huge pages are


def _vm_flags(start: int) -> list[str]:
    """The VmFlags of the mapping that starts at ``start`` (/proc/self/smaps)."""
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16)
            elif head == "VmFlags:" and current == start:
                return line.split()[1:]
    return []


@pytest.mark.parametrize("nbytes", [5 * mmap.PAGESIZE + 100, 2 * HUGE + 100])
def test_mapped_memory_is_a_mapping_of_its_own_that_goes_with_its_last_tensor(nbytes):
    memory = mapped_memory(nbytes)
    assert memory.numel() == nbytes and memory.dtype == torch.uint8
    memory.fill_(7)
    assert memory.data_ptr() % mmap.PAGESIZE == 0  # a mapping's start, not a heap chunk's
    found = mapping_at(memory.data_ptr())
    assert found is not None and "[heap]" not in found[2]
    view = memory.view(torch.int32)[:4]
    address = memory.data_ptr()
    del memory
    gc.collect()
    assert mapping_at(address) is not None  # the view keeps it
    assert int(view[0]) == 0x07070707
    del view
    gc.collect()
    assert mapping_at(address) is None  # unmapped, not kept by malloc
    assert mapped_memory(0).numel() == 0


def test_a_huge_page_aligned_buffer_maps_only_its_own_pages_and_asks_for_huge_pages():
    nbytes = 2 * HUGE + 5000  # not a whole number of pages: rounded up to them
    own = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    gc.collect()  # mappings an earlier test left to the collector go now, not between the counts
    before = vm_data()
    window = mappings._huge_page_aligned(nbytes, HUGE)
    # the room reserved to align it is unmapped again: the process maps only the buffer's pages more
    assert vm_data() - before == own
    assert window is not None
    view = memoryview(window).cast("B")
    assert len(view) == own
    filled = torch.frombuffer(view, dtype=torch.uint8)
    address = filled.data_ptr()
    assert address % HUGE == 0
    # filled in place: a bytes object of its size would come from malloc's heap, which may stay
    # grown after it is freed (glibc's thresholds, raised by what earlier tests freed)
    filled.fill_(1)
    del filled
    if mappings.huge_page_bytes() == HUGE:  # a kernel with 2 MiB transparent huge pages: advised
        assert "hg" in _vm_flags(mapping_at(address)[0])
    del view, window
    gc.collect()
    assert mapping_at(address) is None
    assert vm_data() == before


def test_where_no_aligned_room_is_given_the_buffer_is_an_ordinary_mapping(monkeypatch):
    class RefusingLibc:
        def mmap(self, *args):
            return mappings._MAP_FAILED  # as under a tight RLIMIT_DATA

    monkeypatch.setattr(mappings, "_libc", lambda: RefusingLibc())
    monkeypatch.setattr(mappings, "huge_page_bytes", lambda: HUGE)
    buffer = mapped_buffer(2 * HUGE)
    assert isinstance(buffer, mmap.mmap) and len(buffer) == 2 * HUGE
    memory = mapped_memory(2 * HUGE)
    memory.fill_(3)
    assert int(memory[-1]) == 3


def test_without_transparent_huge_pages_buffers_are_ordinary_mappings(monkeypatch, tmp_path):
    monkeypatch.setattr(mappings, "_PMD_SIZE_FILE", tmp_path / "absent")
    mappings.huge_page_bytes.cache_clear()
    try:
        assert mappings.huge_page_bytes() == 0
        assert isinstance(mapped_buffer(4 * HUGE), mmap.mmap)
    finally:
        mappings.huge_page_bytes.cache_clear()


def test_a_buffer_a_little_short_of_whole_huge_pages_is_mapped_as_them(monkeypatch):
    """A merged block of rows is often a little under a huge page (336 rows x 3072 bfloat16 values:
    2,064,384 bytes): mapped as the whole huge page, aligned and advised, not as 4 KiB pages; a
    buffer far from whole huge pages maps only its own pages."""
    kernel_huge = mappings.huge_page_bytes()
    monkeypatch.setattr(mappings, "huge_page_bytes", lambda: HUGE)
    block = 336 * 3072 * 2
    gc.collect()  # mappings an earlier test left to the collector go now, not between the counts
    before = vm_data()
    memory = mapped_memory(block)
    assert memory.numel() == block
    start, end, _ = mapping_at(memory.data_ptr())
    assert memory.data_ptr() % HUGE == 0 and end - start >= HUGE
    assert vm_data() - before == HUGE  # the block and its 32 KiB to spare, nothing more
    if kernel_huge == HUGE:  # a kernel with 2 MiB huge pages: advised
        assert "hg" in _vm_flags(start)
    del memory
    gc.collect()
    assert vm_data() == before
    # half a huge page more than one: a huge page and its own 4 KiB pages, not two huge pages
    assert mappings._in_whole_huge_pages(HUGE + HUGE // 2, HUGE) == HUGE + HUGE // 2
    assert mappings._in_whole_huge_pages(HUGE - HUGE // 8, HUGE) == HUGE
    assert mappings._in_whole_huge_pages(HUGE - HUGE // 8 - 1, HUGE) == HUGE - HUGE // 8
    assert mappings._in_whole_huge_pages(block, 0) == block
