"""The stacks of the threads a save starts, reserved at the size they use.

A thread's stack is reserved in full when the thread is created: 8 MiB each by default (the
process's RLIMIT_STACK), and RLIMIT_DATA (a process capped at what it holds plus a little) counts
every reservation, touched or not. A save starts a writer thread, an I/O thread and, where the
saving thread never ran a parallel torch kernel before, the OpenMP team torch creates for it (the
producer runs in the saving thread); under a tight cap a team's creation failed (``libgomp: Thread
creation failed``) while the save itself had room. During the save, new threads get :data:`SAVE_THREAD_STACK` bytes instead: Python's
(``threading.stack_size``) and native ones (glibc's default thread attributes, which libgomp's and
torch's own pools use when they set none). What the save's threads run is shallow (a loop over
plan items and torch kernels), far within that. The defaults are put back when the save ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

SAVE_THREAD_STACK = 2 << 20  # bytes of stack a thread the save starts reserves
_ATTR_BYTES = 128  # room for a pthread_attr_t (56 bytes with glibc on x86-64, 64 on aarch64)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        for name in ("pthread_getattr_default_np", "pthread_setattr_default_np", "pthread_attr_setstacksize"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None  # not glibc (or not Linux): Python's own threads are still sized
    return libc


def _native_default(libc: ctypes.CDLL, size: int | None) -> int | None:
    """Set glibc's default thread stack size to ``size`` (None: only read it); the size before."""
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    if libc.pthread_getattr_default_np(attr) != 0:
        return None
    before = ctypes.c_size_t(0)
    libc.pthread_attr_getstacksize(attr, ctypes.byref(before))
    if size is not None:
        if libc.pthread_attr_setstacksize(attr, ctypes.c_size_t(size)) != 0:
            return None
        if libc.pthread_setattr_default_np(attr) != 0:
            return None
    libc.pthread_attr_destroy(attr)
    return int(before.value)


@contextlib.contextmanager
def save_thread_stacks(size: int = SAVE_THREAD_STACK) -> Iterator[None]:
    """New threads reserve ``size`` bytes of stack inside the block (Python's and glibc's defaults)."""
    python_before = threading.stack_size(size)
    libc = _libc()
    native_before = _native_default(libc, size) if libc is not None else None
    try:
        yield
    finally:
        threading.stack_size(python_before)
        if libc is not None and native_before:
            _native_default(libc, native_before)
