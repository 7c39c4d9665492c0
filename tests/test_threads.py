"""The threads a save starts reserve small stacks (RLIMIT_DATA counts each reservation), and the
process's defaults come back afterwards."""

from __future__ import annotations

import threading

from fastsave import threads


def _native_default() -> int | None:
    libc = threads._libc()
    return threads._native_default(libc, None) if libc is not None else None


def test_save_thread_stacks_sets_and_restores_both_defaults():
    python_before, native_before = threading.stack_size(), _native_default()
    with threads.save_thread_stacks():
        assert threading.stack_size() == threads.SAVE_THREAD_STACK
        if native_before is not None:  # glibc
            assert _native_default() == threads.SAVE_THREAD_STACK
        seen = []
        worker = threading.Thread(target=lambda: seen.append(sum(range(1000))))
        worker.start()
        worker.join()
        assert seen == [499500]
    assert threading.stack_size() == python_before
    assert _native_default() == native_before


def test_a_new_thread_gets_the_small_stack():
    """A thread created inside the block runs on a stack of the small size (glibc's own record of
    the running thread's stack, pthread_getattr_np)."""
    import ctypes

    libc = threads._libc()
    assert libc is not None  # the tests run on Linux with glibc
    libc.pthread_self.restype = ctypes.c_ulong
    sizes = []

    def measure() -> None:
        attr = ctypes.create_string_buffer(128)
        assert libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr) == 0
        size = ctypes.c_size_t(0)
        libc.pthread_attr_getstacksize(attr, ctypes.byref(size))
        libc.pthread_attr_destroy(attr)
        sizes.append(size.value)

    with threads.save_thread_stacks():
        inside = threading.Thread(target=measure)
        inside.start()
        inside.join()
    outside = threading.Thread(target=measure)
    outside.start()
    outside.join()
    assert sizes[0] == threads.SAVE_THREAD_STACK
    assert sizes[1] > threads.SAVE_THREAD_STACK  # the process's default again
