"""The threads a save starts reserve small stacks (RLIMIT_DATA counts each reservation), and the
process's defaults come back afterwards."""

from __future__ import annotations

import threading

from process_maps import vm_data

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


def test_a_new_thread_reserves_no_more_than_the_small_stack():
    """What RLIMIT_DATA counts: a thread started inside the block adds at most the small stack to
    VmData while it runs (none when glibc reuses a stack it cached from an earlier thread)."""
    started, release = threading.Event(), threading.Event()

    def wait() -> None:
        started.set()
        release.wait()

    with threads.save_thread_stacks():
        before = vm_data()
        worker = threading.Thread(target=wait)
        worker.start()
        started.wait()
        grown = vm_data() - before
        release.set()
        worker.join()
    assert grown <= threads.SAVE_THREAD_STACK + (1 << 20)  # plus a guard page and Python's own thread state
