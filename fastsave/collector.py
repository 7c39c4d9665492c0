"""Python's cyclic garbage collector around a save: what it may scan while the save runs.

A collection holds the GIL. A full one scans every object the process holds (a loaded
transformers model and its libraries: about half a million objects, 0.19 s on the 2-core
development machine; a notebook that trained holds more), and while it runs neither the producer
nor the I/O thread can hand the disk its next write. When one falls due is decided by what the
process allocated before the save (loading the model, for one), so it lands in a save at random:
measured at 3B, one of three saves in a process took 0.19 s longer for it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a plan is built.

    Planning a large model allocates a few objects per tensor and frees none: every automatic
    collection rescans them all to find nothing (a third of the planning time at 100k tensors).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """The objects that exist when the block starts left out of every collection until it ends.

    Collections still run, over what the block allocates (a cycle it drops is freed as before, so
    memory stays bounded); a full collection that falls due scans only that, and the scan of the
    older objects waits until after the block. Where the process already froze objects itself
    (``gc.freeze``, as a forking server does) nothing changes: unfreezing at the end would unfreeze
    those too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
