"""NaN/Inf in a tensor about to be written: an error naming the tensor, at a few ms per GB.

Checked in the output dtype, after rounding, so an overflow of float16 shows too. ``aminmax`` is
one vectorized pass without temporaries: NaN propagates into both results and an infinity is
the minimum or the maximum, so two finite ends mean a finite tensor. Measured on a 2-core
AVX-512 CPU: 57 ms/GB in bfloat16 and 88 ms/GB in float16 on one thread, against 2.4 s/GB for
``torch.isfinite(t).all()`` and 0.7-1.9 s/GB for integer exponent-bit tests on an int16 view
(those need a temporary and a second pass).

Where fastsave's C kernels load (fastsave.native), a contiguous tensor on the CPU is checked
instead by a count of the values whose exponent field is all ones (exactly the NaN and infinite
ones), one read on the calling thread (fastsave/native/finite.c): ``aminmax`` splits each piece
between torch's OpenMP threads, and on 2 cores a worker preempted by the save's writer or I/O
thread made the reduction wait for it while the disk waited for the reduction. A 250M save's last
tensor, the lm_head copied in 4 MiB pieces, took 38-43 ms of writing with ``aminmax`` against
30-36 ms unchecked (docs/performance.md).

A pass that writes a tensor and counts its NaN/Inf as it rounds (the compiled 4-bit merge,
fastsave.sources.nf4_native) vouches for it with :func:`counted_finite`: the check then skips
that tensor instead of reading it a second time (at 1B on 2 cores the check of every merged
block was a tenth of the save's CPU samples; without it the save takes 1.97 against 2.13
CPU-seconds, median of 6 interleaved rounds).
"""

from __future__ import annotations

import ctypes
import math
import weakref
from functools import cache

import torch

from fastsave.errors import NonFiniteError
from fastsave.native import load_library

# the exponent field of each dtype the C count reads, and the width of its values in bits
_EXPONENTS = {torch.bfloat16: (0x7F80, 16), torch.float16: (0x7C00, 16), torch.float32: (0x7F800000, 32)}

# id(tensor) -> a weak reference to it, for the tensors a counting pass found finite; an entry
# leaves at the tensor's check or at its end (ids are reused only after that)
_counted: dict[int, weakref.ref[torch.Tensor]] = {}


def counted_finite(tensor: torch.Tensor) -> torch.Tensor:
    """Record that ``tensor``'s values were counted as they were written and none is NaN or Inf,
    so that its next :func:`check_finite` returns without reading it; returns ``tensor``.

    Only for a pass that counts in the tensor's own dtype, after rounding (what check_finite
    tests), and only for a tensor nothing writes to afterwards.
    """
    key = id(tensor)
    _counted[key] = weakref.ref(tensor, lambda _, key=key: _counted.pop(key, None))
    return tensor


@cache
def _library() -> ctypes.CDLL | None:
    library = load_library("finite")
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.fastsave_count_nonfinite16.argtypes = [pointer, size, ctypes.c_uint16]
    library.fastsave_count_nonfinite16.restype = size
    library.fastsave_count_nonfinite32.argtypes = [pointer, size, ctypes.c_uint32]
    library.fastsave_count_nonfinite32.restype = size
    return library


def count_nonfinite(tensor: torch.Tensor) -> int | None:
    """How many of ``tensor``'s values are NaN or infinite, counted by the C kernel on this thread;
    None where it does not apply (another dtype or device, a tensor not contiguous, no kernels)."""
    exponent = _EXPONENTS.get(tensor.dtype)
    if exponent is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    library = _library()
    if library is None:
        return None
    count = library.fastsave_count_nonfinite16 if exponent[1] == 16 else library.fastsave_count_nonfinite32
    return int(count(tensor.data_ptr(), tensor.numel(), exponent[0]))


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError when the floating tensor ``tensor`` holds NaN or Inf (a tensor that
    :func:`counted_finite` vouched for is not read again).

    Raises:
        NonFiniteError: naming the tensor and how many values are NaN and Inf; for float16 it
            says that an overflow shows as Inf and that bfloat16 has float32's range.
    """
    vouched = _counted.pop(id(tensor), None)
    if vouched is not None and vouched() is tensor:
        return
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    counted = count_nonfinite(tensor)
    if counted == 0:
        return
    if counted is None:
        low, high = torch.aminmax(tensor)
        if math.isfinite(low.item()) and math.isfinite(high.item()):
            return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    message = (
        f"tensor {name!r} ({str(tensor.dtype).removeprefix('torch.')}, {tensor.numel()} values) holds "
        f"{nan} NaN and {inf} Inf values; nothing was published and the save directory keeps its "
        "previous contents."
    )
    if tensor.dtype == torch.float16:
        message += (
            " float16 holds magnitudes up to 65504 only, so a merged weight beyond that overflows to Inf:"
            " save with dtype=torch.bfloat16 (float32's range)."
        )
    else:
        message += " The model or adapter weight is broken (a diverged training run?)."
    raise NonFiniteError(message)
