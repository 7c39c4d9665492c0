"""A 16-bit weight on disk as a QLoRA training run saw it: quantized to 4-bit and dequantized again.

Training loaded the base with ``load_in_4bit``, which quantizes every weight that transformers'
bitsandbytes integration converts (each ``nn.Linear`` / ``Conv1D`` except the output embedding,
``_keep_in_fp32_modules`` and ``llm_int8_skip_modules``), not only the LoRA targets. Reproducing
that from the 16-bit checkpoint: cast to the dtype the model was loaded in (transformers casts
before it quantizes), quantize with ``bitsandbytes.functional.quantize_4bit`` with the training
settings, dequantize in float32. bitsandbytes' CPU quantization is deterministic, so this equals
the dequantized weight of the trained 4-bit model bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsave.errors import PlanError
from fastsave.sources.base import RowReader, Source
from fastsave.sources.bnb import bnb_functional
from fastsave.sources.nf4_fused import block_absmax, compiled_merge_matches, round_trip, round_trip_merge
from fastsave.sources.settings_4bit import Quant4bitSettings

# what the first pass of a double-quantized round trip holds at a time: the working set a merge's
# row block is admitted for (fastsave.merge.row_blocks.block_working_bytes of a block of
# fastsave.merge.assemble.BLOCK_BYTES: three float32 copies of its rows), so that the pass holds no
# more of a weight at once than the merge that follows it. It holds the rows as stored (read-only
# pages of the file) and, on the torch path, their absolute values: twice the stored bytes a value.
# Fewer, larger reads: at 1B on 2 cores, 3M bfloat16 values a read instead of 1M took 0.04-0.06 s off
# `fastsave merge`.
FIRST_PASS_BYTES = 12 << 20


def quantize_dequantize_float32(
    weight: torch.Tensor, settings: Quant4bitSettings, dtype: torch.dtype, conv1d: bool
) -> torch.Tensor:
    """What a 4-bit load makes of ``weight`` (stored layout): cast, quantize, dequantize in float32."""
    source = weight.to(dtype)
    if conv1d:  # transformers quantizes Conv1D weights transposed, in the Linear (out, in) layout
        source = source.T.contiguous()
    codes, state = bnb_functional.quantize_4bit(
        source,
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=torch.uint8,
    )
    state.dtype = torch.float32  # code * absmax in float32, no rounding
    out = bnb_functional.dequantize_4bit(codes, state)
    return out.T.contiguous() if conv1d else out


class Nf4RoundTripSource(Source):
    """``inner`` (a 16-bit tensor on disk) through a 4-bit quantize + dequantize, as training saw it.

    ``conv1d``: the stored layout is a Conv1D's (in, out); the quantization runs on its transpose,
    as transformers' does, and the values are given back in the stored layout.
    """

    kind = "NF4 round trip of the 16-bit checkpoint"
    computed = True

    def __init__(self, inner: Source, settings: Quant4bitSettings, dtype: torch.dtype, conv1d: bool) -> None:
        super().__init__(inner.shape, inner.stored_dtype, inner.device)
        self.inner = inner
        self.quant_settings = settings
        self.load_dtype = dtype
        self.conv1d = conv1d
        self.quantized_as_transpose = conv1d

    @property
    def floating(self) -> bool:
        """A weight is floating."""
        return True

    def float32(self) -> torch.Tensor:
        """The dequantized values of the quantized weight."""
        return quantize_dequantize_float32(
            self.inner.as_stored(), self.quant_settings, self.load_dtype, self.conv1d
        )

    def as_stored(self) -> torch.Tensor:
        """Not a stored tensor: its values are computed."""
        return self.float32()

    def row_reader(self) -> RowReader | None:
        """Rows of the round trip, the same bits as the whole-tensor quantization (when blocks fit in rows).

        4-bit codes of a block depend only on the block's values and its absmax, so they are computed
        row block by row block; without double quantization each block decodes with its own absmax.
        Double quantization is global (its offset is the mean of every
        block's absmax), so a first pass reads the rows once to collect the absmax of every block
        (max |x| is exact in any precision), quantizes that vector as bitsandbytes does, and each
        row block is then quantized and decoded with its part of it, in one pass where that gives
        bitsandbytes' bits (fastsave.sources.nf4_fused).
        """
        inner = self.inner.row_reader()
        settings = self.quant_settings
        if inner is None or self.conv1d or len(self.shape) != 2 or self.shape[1] % settings.blocksize:
            return None
        # the rows as training loaded them: cast from the stored dtype (through float32 or not: the
        # same value, float32 holds every 16-bit one), without a float32 copy where the file has rows
        # (read-only pages of the file there: cast, or read by the round trip, never written)
        read16 = inner.read_stored or inner.read

        def load(i: int, j: int) -> torch.Tensor:
            return read16(i, j).to(self.load_dtype)

        if not settings.double_quant:  # each block decodes with its own absmax: one pass

            def read_single_into(i: int, j: int, out: torch.Tensor | None) -> torch.Tensor:
                return round_trip(load(i, j), settings, None, out)

            def read_single_merged(i: int, j: int, product, scaling: float, out: torch.Tensor) -> int:
                return round_trip_merge(load(i, j), settings, None, product, scaling, out)

            return RowReader(
                lambda i, j: read_single_into(i, j, None),
                read_into=read_single_into,
                read_merged=read_single_merged if self._merges_in_one_pass() else None,
            )
        n_rows, n_cols = self.shape
        blocks_per_row = n_cols // settings.blocksize
        # the first pass reads 3M bfloat16 values (1.5M float32 ones) at a time
        step = max(1, FIRST_PASS_BYTES // (2 * self.stored_dtype.itemsize * n_cols))
        # from the last rows to the first: the merge that follows reads from the first rows on, so
        # the rows it reads first are those the pass read last, still in the cache when the weight
        # is larger than it (at 3B on 2 cores 5.11 against 5.29 s for `fastsave merge`, 1B 1.91
        # against 1.97 s, medians of 7 interleaved rounds in one process)
        backwards = [
            block_absmax(load(i, min(n_rows, i + step)), settings.blocksize)
            for i in reversed(range(0, n_rows, step))
        ]
        absmax = torch.cat(backwards[::-1])
        offset = absmax.mean()
        quantized, state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=256)
        absmax = bnb_functional.dequantize_blockwise(quantized, state2) + offset

        def read_into(i: int, j: int, out: torch.Tensor | None) -> torch.Tensor:
            return round_trip(load(i, j), settings, absmax[i * blocks_per_row : j * blocks_per_row], out)

        def read_merged(i: int, j: int, product, scaling: float, out: torch.Tensor) -> int:
            rows_absmax = absmax[i * blocks_per_row : j * blocks_per_row]
            return round_trip_merge(load(i, j), settings, rows_absmax, product, scaling, out)

        return RowReader(
            lambda i, j: read_into(i, j, None),
            read_into=read_into,
            read_merged=read_merged if self._merges_in_one_pass() else None,
        )

    def _merges_in_one_pass(self) -> bool:
        """Whether the compiled round trip, with the merge in the same pass, serves these settings."""
        settings = self.quant_settings
        return compiled_merge_matches(settings.quant_type, settings.blocksize, self.load_dtype)

    def describe(self) -> str:
        """How the weight was reproduced."""
        s = self.quant_settings
        return f"{s.quant_type} round trip (blocksize {s.blocksize}, double quant {'on' if s.double_quant else 'off'})"


def quantized_module_names(model: nn.Module, skip_modules: list[str] | None = None) -> set[str]:
    """The modules a ``load_in_4bit`` load of ``model`` turns into bitsandbytes Linear4bit layers.

    Uses transformers' own rule (nn.Linear and Conv1D, minus get_modules_to_not_convert: the output
    embedding, tied modules, _keep_in_fp32_modules, llm_int8_skip_modules).

    Raises:
        PlanError: this transformers has no such rule to ask; no approximation is made.
    """
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError as error:
        raise PlanError(
            "this transformers version does not expose the rule for which weights a 4-bit load quantizes "
            "(transformers.quantizers.quantizers_utils.should_convert_module), so the 'dequantized' merge "
            "cannot reproduce what training saw: upgrade transformers, or merge with --base-weights original"
        ) from error
    quantizer = Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip_modules))
    not_convert = quantizer.get_modules_to_not_convert(
        model, skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    return {
        name
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D))
        and should_convert_module(name, not_convert)
    }
