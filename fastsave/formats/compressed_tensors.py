"""save_method="fp8", "fp8_block", "w8a16", "w4a16", "w4a16_asym", "nvfp4a16", "mxfp4a16": checkpoints
vLLM serves quantized, in compressed-tensors' format, streamed from the merge.

Each Linear weight of the merged plan (all but ``lm_head``; embeddings, norms and biases stay
16-bit) is quantized a block of rows at a time as the merge produces it, with llm-compressor's
data-free arithmetic (fastsave.formats.compressed_arithmetic), and written as the tensors
compressed-tensors' compressor for the scheme writes::

    fp8, fp8_block          <module>.weight (float8_e4m3fn), <module>.weight_scale
    w8a16, w4a16            <module>.weight_packed (int32), .weight_scale, .weight_shape (int64)
    w4a16_asym              ... and .weight_zero_point (int32, packed down the rows)
    nvfp4a16                <module>.weight_packed (uint8, two codes a byte), .weight_scale
                            (float8_e4m3fn), .weight_global_scale (float32)
    mxfp4a16                <module>.weight_packed (uint8), .weight_scale (uint8, E8M0)

config.json gets the ``quantization_config`` llm-compressor writes for the scheme. No 16-bit copy
of the model is written anywhere: a weight's row blocks are quantized as they leave the merge and
only its quantized form (at most half its 16-bit size) is held until it is written.

NVFP4 scales each weight by a global scale from its largest magnitude, shared by the sibling
projections vLLM fuses (q/k/v, gate/up), so each such weight is merged twice: once for the largest
magnitude of it and its siblings, once to quantize it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from fastsave.compressed_schemes import FUSED_SIBLINGS, IGNORE, SCHEMES, CompressedScheme
from fastsave.errors import PlanError
from fastsave.formats.compressed_arithmetic import (
    FP8,
    absmax,
    global_scale,
    pack_fp4,
    pack_int,
    pack_zero_points,
    quantize_rows,
    scale_dtype_for,
)
from fastsave.formats.registry import OutputFormat
from fastsave.io.finite import check_finite
from fastsave.plan.items import Plan, PlanItem, SharedProducer

logger = logging.getLogger(__name__)

# Bytes of a row block quantized at once: small enough to stay in cache-sized pieces, large enough
# that per-block overhead vanishes.
ROW_BLOCK_BYTES = 4 << 20


def compressed_layout(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: CompressedScheme
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor compressed-tensors writes for the weight ``name``."""
    module = name.removesuffix(".weight")
    rows, cols = shape
    kept = scale_dtype_for(dtype)
    if scheme.kind == "int":
        groups = cols // scheme.group_size
        layout = [
            (f"{module}.weight_packed", (rows, -(-cols * scheme.num_bits // 32)), torch.int32),
            (f"{module}.weight_scale", (rows, groups), kept),
            (f"{module}.weight_shape", (2,), torch.int64),
        ]
        if not scheme.symmetric:
            layout.append(
                (f"{module}.weight_zero_point", (-(-rows * scheme.num_bits // 32), groups), torch.int32)
            )
        return layout
    if scheme.num_bits == 8:
        if scheme.strategy == "block":
            height, width = scheme.block
            scale_shape = (-(-rows // height), -(-cols // width))
        else:
            scale_shape = (rows, 1)
        return [(f"{module}.weight", (rows, cols), FP8), (f"{module}.weight_scale", scale_shape, kept)]
    groups = cols // scheme.group_size
    if scheme.scale_dtype == "float8_e4m3fn":
        return [
            (f"{module}.weight_packed", (rows, cols // 2), torch.uint8),
            (f"{module}.weight_scale", (rows, groups), FP8),
            (f"{module}.weight_global_scale", (1,), torch.float32),
        ]
    return [
        (f"{module}.weight_packed", (rows, cols // 2), torch.uint8),
        (f"{module}.weight_scale", (rows, groups), torch.uint8),
    ]


def row_blocks(source: PlanItem, rows_per_block: int) -> Iterator[torch.Tensor]:
    """The source weight's values as blocks of ``rows_per_block`` whole rows (the last may be shorter)."""
    cols = source.shape[1]
    wanted = rows_per_block * cols
    held: list[torch.Tensor] = []
    count = 0
    for piece in source.pieces():
        held.append(piece.reshape(-1))
        count += held[-1].numel()
        while count >= wanted:
            flat = torch.cat(held) if len(held) > 1 else held[0]
            yield flat[:wanted].view(rows_per_block, cols)
            rest = flat[wanted:]
            held, count = ([rest] if rest.numel() else []), rest.numel()
    if count:
        flat = torch.cat(held) if len(held) > 1 else held[0]
        yield flat.view(-1, cols)


def _rows_per_block(shape: tuple[int, ...], dtype: torch.dtype, scheme: CompressedScheme) -> int:
    # fp8_block: whole 128-row blocks (a scale covers 128 rows); otherwise any row count gives the same
    # bits, and at least 8 rows a block keeps the per-block overhead small
    align = scheme.block[0] if scheme.block else 8
    rows = max(1, ROW_BLOCK_BYTES // (shape[1] * dtype.itemsize))
    return max(align, rows // align * align)


class GlobalScale:
    """NVFP4's global scale of a set of fused sibling weights: from the largest magnitude of them all."""

    def __init__(self, members: list[PlanItem], scheme: CompressedScheme) -> None:
        self.members = members
        self.scheme = scheme
        self._value: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        """The float32 [1] scale (each member merged once more to find it, the first time it is asked for)."""
        if self._value is None:
            largest = None
            for member in self.members:
                for block in row_blocks(member, _rows_per_block(member.shape, member.dtype, self.scheme)):
                    check_finite(block, member.name)
                    found = absmax(block, self.scheme)
                    largest = found if largest is None else torch.max(largest, found)
            self._value = global_scale(largest)
        return self._value


class _CompressedWeight:
    """The tensors of one quantized Linear weight, made together from its merged row blocks."""

    def __init__(self, source: PlanItem, scheme: CompressedScheme, shared: GlobalScale | None) -> None:
        self.source = source
        self.scheme = scheme
        self.shared = shared
        self.layout = compressed_layout(source.name, source.shape, source.dtype, scheme)
        self.group = SharedProducer(self._make, source.participate)

    def working_bytes(self) -> int:
        """The source's own working set (NVFP4: the largest of its siblings', merged first for the
        global scale), every part held until written, one row block's temporaries."""
        outputs = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.layout)
        block = _rows_per_block(self.source.shape, self.source.dtype, self.scheme) * self.source.shape[1]
        members = self.shared.members if self.shared is not None else [self.source]
        return max(member.working_set() for member in members) + outputs + 16 * block

    def _make(self) -> dict[str, torch.Tensor]:
        scheme = self.scheme
        shared = self.shared.value() if self.shared is not None else None
        codes, scales, zero_points = [], [], []
        for block in row_blocks(self.source, _rows_per_block(self.source.shape, self.source.dtype, scheme)):
            check_finite(block, self.source.name)
            quantized = quantize_rows(block, scheme, shared)
            if scheme.kind == "int":
                codes.append(pack_int(quantized.codes, scheme.num_bits))
            elif scheme.num_bits == 4:
                codes.append(pack_fp4(quantized.codes))
            else:
                codes.append(quantized.codes)
            scales.append(quantized.scales)
            if quantized.zero_points is not None:
                zero_points.append(quantized.zero_points)
        names = [name for name, _, _ in self.layout]
        parts = {names[0]: torch.cat(codes), names[1]: torch.cat(scales)}
        del codes, scales
        if scheme.kind == "int":
            parts[names[2]] = torch.tensor(self.source.shape, dtype=torch.int64)
            if zero_points:
                parts[names[3]] = pack_zero_points(torch.cat(zero_points), scheme.num_bits)
        elif shared is not None:
            parts[names[2]] = shared.clone()
        got = {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}
        expected = {n: (s, d) for n, s, d in self.layout}
        if got != expected:  # cannot happen: the layout and the arithmetic are held together by tests
            raise RuntimeError(f"quantized {self.source.name} into {got}, planned {expected}")
        return parts

    def items(self) -> list[PlanItem]:
        """The plan items of its parts, in write order; the first carries the census entry."""
        return [
            self.group.item(
                name,
                shape,
                dtype,
                lora_module=self.source.lora_module if index == 0 else None,
                source_kind=self.source.source_kind,
                holds_codes=dtype == FP8,  # codes: the writer's NaN check does not apply
                working_bytes=self.working_bytes if index == 0 else 0,
            )
            for index, (name, shape, dtype) in enumerate(self.layout)
        ]


def quantized_targets(plan: Plan) -> list[PlanItem]:
    """The items a compressed-tensors save quantizes: every Linear weight but the ignored ones."""
    return [
        item for item in plan.items if item.linear_weight and item.name.removesuffix(".weight") not in IGNORE
    ]


def _refuse_indivisible(targets: list[PlanItem], scheme: CompressedScheme) -> None:
    if scheme.group_size is None:
        return
    bad = [(t.name.removesuffix(".weight"), t.shape[1]) for t in targets if t.shape[1] % scheme.group_size]
    if bad:
        listed = ", ".join(f"{name} ({cols} inputs)" for name, cols in bad[:6]) + (
            " ..." if len(bad) > 6 else ""
        )
        raise PlanError(
            f"save_method={scheme.save_method!r} quantizes groups of {scheme.group_size} input columns, and "
            f"{len(bad)} layer(s) have an in_features that is not a multiple of {scheme.group_size}: {listed}. "
            "llm-compressor refuses these too. Use a per-channel scheme ('fp8') or 128x128 blocks "
            "('fp8_block', which pads); nothing was written."
        )


def _fused_scales(targets: list[PlanItem], scheme: CompressedScheme) -> dict[str, GlobalScale]:
    """Each target's global scale: shared by the sibling projections vLLM fuses, else its own."""
    by_name = {t.name.removesuffix(".weight"): t for t in targets}
    shared: dict[str, GlobalScale] = {}
    for name, target in by_name.items():
        if name in shared:
            continue
        parent, _, _ = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        for siblings in FUSED_SIBLINGS:
            names = [prefix + leaf for leaf in siblings]
            if name in names and all(n in by_name for n in names):
                scale = GlobalScale([by_name[n] for n in names], scheme)
                shared.update(dict.fromkeys(names, scale))
                break
        else:
            shared[name] = GlobalScale([target], scheme)
    return shared


def compress_plan(plan: Plan, scheme: CompressedScheme) -> Plan:
    """The plan of a compressed-tensors save: each quantized Linear weight becomes its compressed parts.

    Raises:
        PlanError: a layer the scheme cannot quantize (group size), or NVFP4 across ranks; before
            anything is written.
    """
    targets = quantized_targets(plan)
    _refuse_indivisible(targets, scheme)
    shared: dict[str, GlobalScale] = {}
    if scheme.strategy == "tensor_group":
        if any(t.participate is not None for t in targets):
            raise PlanError(
                f"save_method={scheme.save_method!r} needs each weight's largest magnitude (and its fused "
                "siblings') before quantizing it, which a save across ranks does not support yet; save on "
                "one process, or use 'mxfp4a16' / 'w4a16'"
            )
        shared = _fused_scales(targets, scheme)
    chosen = {id(t) for t in targets}
    items: list[PlanItem] = []
    for item in plan.items:
        if id(item) not in chosen:
            items.append(item)
            continue
        weight = _CompressedWeight(item, scheme, shared.get(item.name.removesuffix(".weight")))
        items.extend(weight.items())
    return replace(plan, items=items)


def _format(scheme: CompressedScheme) -> OutputFormat:
    def transform(save_input: Any, plan: Plan) -> Plan:
        return compress_plan(plan, scheme)

    def summary(plan: Plan) -> list[str]:
        quantized = sum(1 for item in plan.items if item.name.endswith(".weight_scale"))
        return [
            f"  quantized {quantized} Linear weights to {scheme.preset} ({scheme.format}, compressed-tensors); "
            "lm_head, embeddings and norms kept 16-bit"
        ]

    return OutputFormat(
        save_method=scheme.save_method,
        transform=transform,
        quantization_config=lambda save_input, plan: scheme.quantization_config(),
        summary=summary,
    )


FORMATS = [_format(scheme) for scheme in SCHEMES.values()]
