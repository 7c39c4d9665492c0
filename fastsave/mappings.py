"""Memory in mappings of its own, in huge pages where the kernel gives them: what the disk reads from.

A save's large buffers (the write buffers, the pool's merged blocks, an exactness check's
product) are private anonymous mappings, outside malloc's heap (fastsave.buffer_pool says why),
unmapped when their last tensor is gone.

Why huge pages: O_DIRECT hands the device the buffer's physical pages, and the block layer merges
only pages that are physically adjacent into one segment of a request (virtio-blk here takes at
most 254 segments). Pages faulted one by one in a process that has run a while are scattered:
on this project's 2-core virtual machine, 1 GiB written O_DIRECT in 8 MiB writes from pages faulted
in random order took 1.37x as long as from a shared mapping (``mmap.mmap(-1, n)``), and from
transparent huge pages (2 MiB physically contiguous) 0.88x as long, interleaved, five rounds. In a
1B save the I/O thread's writes went at 1.59-2.33 GB/s from huge pages against 1.28-1.49 GB/s, and
the save took 0.99-1.40 s against 1.46-1.71 s (six interleaved pairs of fresh processes).

How: on Linux with transparent huge pages (``/sys/kernel/mm/transparent_hugepage/hpage_pmd_size``),
a buffer of at least one huge page (or a little short of whole huge pages: rounded up to them,
:data:`SPARE_SHARE`) is mapped with room to spare, the spare head and tail unmapped
again so that it starts at a huge-page boundary and maps only its own pages (RLIMIT_DATA counts
mapped bytes, touched or not: fastsave's memory cap holds), and its whole huge pages are advised
``MADV_HUGEPAGE`` (the kernel's default ``madvise`` mode gives huge pages to such ranges only).
The kernel may still give 4 KiB pages (no free 2 MiB block): the memory is the same, only the
writes slower. Elsewhere, and for smaller buffers, an ordinary private mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_PMD_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")


@cache
def huge_page_bytes() -> int:
    """The size of a transparent huge page (2 MiB on x86-64), or 0 where there are none."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    try:
        size = int(_PMD_SIZE_FILE.read_text().strip())
    except (OSError, ValueError):
        return 0
    return size if size > mmap.PAGESIZE and size % mmap.PAGESIZE == 0 else 0


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_, munmap, madvise = libc.mmap, libc.munmap, libc.madvise
    except (OSError, AttributeError):
        return None
    mmap_.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    mmap_.restype = ctypes.c_void_p
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    munmap.restype = ctypes.c_int
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return libc


_MAP_FAILED = ctypes.c_void_p(-1).value


def mapped_buffer(nbytes: int) -> mmap.mmap | ctypes.Array:
    """``nbytes`` of new memory, private and anonymous (counted in RssAnon like malloc's), as a
    writable buffer object over a mapping of its own: it starts at a page boundary (at a huge
    page's where it holds one) and is unmapped when the object is gone (a view of it, memoryview
    or tensor, holds it), never kept in malloc's heap. At least one byte; more where a little
    more makes whole huge pages (:data:`SPARE_SHARE`)."""
    huge = huge_page_bytes()
    length = _in_whole_huge_pages(nbytes, huge)
    if huge and length >= huge:
        window = _huge_page_aligned(length, huge)
        if window is not None:
            return window
    return mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


# A buffer at most this share short of a whole number of huge pages is mapped as that many: a merged
# block of rows is a little under one huge page for most widths (336 rows x 3072 bfloat16 values,
# 96 x 10752, 288 x 3584: 2,064,384 bytes, 32 KiB short of 2 MiB), and mapped to its size it got no
# huge page at all. In a 3B save on 2 cores the I/O thread's writes, mostly of such blocks, went at
# 2.2 GB/s inside the system call (strace) against 3.7 GB/s for 16 MiB from huge pages.
SPARE_SHARE = 8


def _in_whole_huge_pages(nbytes: int, huge: int) -> int:
    """The bytes to map for a buffer of ``nbytes``: rounded up to whole huge pages where that adds
    at most a :data:`SPARE_SHARE` of them, else to whole pages."""
    pages = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    if not huge:
        return pages
    whole = -(-nbytes // huge) * huge
    return whole if (whole - nbytes) * SPARE_SHARE <= whole else pages


def mapped_memory(nbytes: int) -> torch.Tensor:
    """:func:`mapped_buffer`'s memory as a uint8 tensor of ``nbytes`` (torch.frombuffer holds the
    buffer object as long as a tensor uses the memory)."""
    import torch  # here: the writer (fastsave.io.direct_file) imports this module without torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mapped_buffer(nbytes), dtype=torch.uint8, count=nbytes)


def _huge_page_aligned(nbytes: int, huge: int) -> ctypes.Array | None:
    """A mapping of ``nbytes`` (rounded up to pages) starting at a multiple of ``huge``, its whole
    huge pages advised; None when the room to align it is refused (RLIMIT_DATA, no memory): the
    caller maps it plainly, which needs no room to spare."""
    libc = _libc()
    if libc is None:
        return None
    length = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    reserved = length + huge
    base = libc.mmap(
        None, reserved, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    if base is None or base == _MAP_FAILED:
        return None
    start = base + (-base % huge)
    # give back the room to spare before and after: only the buffer's own pages stay mapped
    if start > base:
        libc.munmap(base, start - base)
    if base + reserved > start + length:
        libc.munmap(start + length, base + reserved - start - length)
    libc.madvise(start, length // huge * huge, mmap.MADV_HUGEPAGE)  # refused: 4 KiB pages, still correct
    window = (ctypes.c_char * length).from_address(start)
    # the mapping goes with the window object, which the buffer's views hold (not at interpreter
    # exit, while a view may still be read)
    weakref.finalize(window, libc.munmap, start, length).atexit = False
    return window
