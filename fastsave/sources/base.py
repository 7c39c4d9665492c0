"""What every source of a weight offers the merge: its shape, float32 values, and rows on request.

A *source* is where the values of one output tensor come from before any adapter is added: a
bitsandbytes 4-bit or 8-bit weight, an HQQ or torchao weight, a plain tensor in memory, a tensor
in a safetensors file on disk, the NF4 round trip of such a tensor. The merge dispatcher
(fastsave.merge.dispatch) knows nothing of these kinds; it asks a source only for what can be
measured (device, shape, whether it reads by rows) and for values.

Values are always given in the *compute layout*: the layout the module multiplies with
((out_features, in_features) for a linear layer), which is the layout the LoRA delta is defined in.
The plan's layout step turns that into the checkpoint's layout where they differ.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastsave.sources.settings_4bit import Quant4bitSettings

# read(i, j) -> rows i..j of the float32 weight as a new tensor
RowRead = Callable[[int, int], torch.Tensor]
# read_into(i, j, out) -> rows i..j of the float32 weight, written into out
RowReadInto = Callable[[int, int, torch.Tensor], torch.Tensor]
# rows i..j plus a float32 product (or None) times a scaling, rounded into ``out``; NaN/Inf written
RowReadMerged = Callable[[int, int, "torch.Tensor | None", float, torch.Tensor], int]
# (i, j, B's rows i..j, A, scaling, out) -> NaN/Inf written
RowReadFactors = Callable[[int, int, torch.Tensor, torch.Tensor, float, torch.Tensor], int]


@dataclass(frozen=True)
class RowReader:
    """Rows of a 2-D weight on demand: ``read(i, j)`` (a new float32 tensor), in steps of ``alignment`` rows.

    ``read_stored(i, j)``, where the source has it: the same rows in their stored dtype, for a
    consumer that casts them to another one (the 4-bit round trip) without a float32 copy between;
    possibly a read-only view (of a file's pages): never written to.
    ``read_into(i, j, out)``, where the source can: the float32 rows written into ``out`` (a
    contiguous float32 tensor of their shape) and returned, for a consumer that reuses one block's
    memory for every block. Fresh memory per block costs its pages' faults and zeroing each time
    the allocator has given them back: measured on 2 cores, a third of the NF4 round trip's time.
    ``read_merged(i, j, product, scaling, out)``, where the source can: the rows plus ``product``
    (float32, or None) times ``scaling``, rounded once into ``out`` (bfloat16 or float32), in one
    pass with the same bits as ``read`` then the torch merge; returns how many NaN/Inf it wrote.
    ``read_merged_factors(i, j, b, a, scaling, out)``, where the source can: ``read_merged`` with
    the product ``b @ a`` (float32 factors: B's rows i..j, A) computed value by value in the pass,
    as fastsave.sources.nf4_native.lora_product_mismatches checks it; the caller checks that this
    gives the BLAS's product for the shape (fastsave.merge.fused_rows) before it relies on it.
    ``held_bytes``: what the reader itself holds while the weight is read, beyond the source's own
    memory (a 4-bit weight's absmax decoded to float32), where the source knows it; None: not known
    (the merge's working set then stays at its planning estimate, fastsave.merge.dispatch).
    """

    read: RowRead
    alignment: int = 1
    read_stored: RowRead | None = None
    read_into: RowReadInto | None = None
    read_merged: RowReadMerged | None = None
    read_merged_factors: RowReadFactors | None = None
    held_bytes: int | None = None


class Source(abc.ABC):
    """The values of one tensor, before adapters are added. Subclasses say where they come from.

    Attributes:
        shape: the shape in the compute layout.
        kind: a few words for the save log ("4-bit", "16-bit", "safetensors file", ...).
        quant_settings: the bitsandbytes 4-bit settings the weight was trained with, when it was a
            bnb 4-bit weight (used to re-quantize it for save_method="merged_4bit_forced").
        quantized_as_transpose: the weight is stored as a Conv1D's (in, out) and was quantized
            transposed, as transformers quantizes it.
        computed: the values are computed from a quantized form (so even without a delta they go
            through the merge dispatcher, in row blocks where the source reads rows).
    """

    kind = "tensor"
    quant_settings: Quant4bitSettings | None = None
    quantized_as_transpose = False
    computed = False  # values are computed (dequantized, round-tripped), not stored as they are

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.stored_dtype = dtype  # the dtype of the values as stored (the codes' dtype when quantized)
        self.device = torch.device(device)

    # ------------------------------------------------------------------ what kinds override

    @property
    def floating(self) -> bool:
        """Whether the values are floating point (quantized weights represent floating values)."""
        return self.stored_dtype.is_floating_point

    @abc.abstractmethod
    def float32(self) -> torch.Tensor:
        """The values as a new float32 tensor on :attr:`device` (never a view of the model's storage).

        Every kind of source defines it (a class without it cannot be instantiated).
        """

    def as_stored(self) -> torch.Tensor:
        """The values in their own dtype, for a tensor copied without any arithmetic (may be a view)."""
        return self.float32()

    def row_reader(self) -> RowReader | None:
        """Rows on demand, when this source can give them without materializing the whole tensor."""
        return None

    def packed_4bit(self) -> tuple[torch.Tensor, object] | None:
        """``(codes, quant_state)`` of a bitsandbytes packed 4-bit weight, for the fused Triton kernel."""
        return None

    def stored_rows(self) -> RowRead | None:
        """Rows i..j of a 2-D tensor in their stored dtype, read without the whole tensor (possibly
        read-only views of a file's pages: never written to), where the source reads them so (a
        checkpoint on disk); None where :meth:`as_stored` is the way (a tensor in memory)."""
        return None

    # ------------------------------------------------------------------ derived

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def describe(self) -> str:
        """The log's words for this source."""
        return self.kind
