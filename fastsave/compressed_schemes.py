"""The compressed-tensors schemes fastsave writes, as llm-compressor's data-free presets define them.

Each save method names one preset of compressed-tensors (``QuantizationModifier(scheme=...)`` in
llm-compressor): what the weights become (integer or float, bits, per channel / per group / per
128x128 block / per group under one global scale), the checkpoint format vLLM reads them by, and
the ``quantization_config`` llm-compressor 0.14 (compressed-tensors 0.19) writes for it, field for
field, so that a loader reads our checkpoint the way it reads theirs.

Torch-free: the command line checks ``--save-method`` against :data:`SCHEMES` before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The compressed-tensors version whose config and arithmetic these checkpoints reproduce.
COMPRESSED_TENSORS_VERSION = "0.19.0"
# Every quantized Linear except the output head, as llm-compressor's usual recipe has it.
IGNORE = ("lm_head",)
# Sibling projections vLLM fuses into one matrix: under a global scale (NVFP4) they share it, the
# largest of the group's (llm-compressor's FUSED_LAYER_NAMES).
FUSED_SIBLINGS = (
    ("gate_proj", "up_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("w1", "w3"),
)


@dataclass(frozen=True)
class CompressedScheme:
    """One data-free compressed-tensors scheme.

    Attributes:
        save_method: the save_method users pass (Unsloth's name).
        preset: compressed-tensors' preset name (llm-compressor's ``scheme=``).
        kind: "int" or "float" weights.
        num_bits: bits per weight.
        strategy: "channel" (one scale per row), "group" (per ``group_size`` columns), "block"
            (per ``block`` rows x columns) or "tensor_group" (per group, under one global scale).
        group_size: columns per group ("group", "tensor_group").
        block: (rows, columns) of a block ("block").
        symmetric: no zero point.
        scale_dtype: how a scale is stored when not in the model's dtype: "float8_e4m3fn" (NVFP4)
            or "e8m0" (MX: a power of two, stored as its biased exponent in a uint8).
        format: the checkpoint format (compressed-tensors' compressor).
        input_activations: the preset's activation arguments (dynamic: nothing stored), or None.
    """

    save_method: str
    preset: str
    kind: str
    num_bits: int
    strategy: str
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    scale_dtype: str | None = None
    format: str = "pack-quantized"
    input_activations: dict[str, Any] | None = None

    @property
    def columns_per_scale(self) -> int | None:
        """Columns that share one scale (None: a whole row, or a block)."""
        return self.group_size

    def weights_config(self) -> dict[str, Any]:
        """The ``weights`` arguments as compressed-tensors 0.19 serializes them."""
        zp_dtype = None if self.symmetric else "torch.int8"
        scale_dtype = {"float8_e4m3fn": "torch.float8_e4m3fn", "e8m0": "torch.uint8"}.get(
            self.scale_dtype or ""
        )
        return {
            "actorder": None,
            "block_structure": list(self.block) if self.block else None,
            "dynamic": False,
            "group_size": self.group_size,
            "num_bits": self.num_bits,
            "observer": "memoryless_minmax",
            "observer_kwargs": {},
            "scale_dtype": scale_dtype,
            "strategy": self.strategy,
            "symmetric": self.symmetric,
            "type": self.kind,
            "zp_dtype": zp_dtype,
        }

    def quantization_config(self) -> dict[str, Any]:
        """config.json's ``quantization_config``, as llm-compressor writes it for this scheme."""
        return {
            "config_groups": {
                "group_0": {
                    "format": self.format,
                    "input_activations": dict(self.input_activations) if self.input_activations else None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": self.weights_config(),
                }
            },
            "format": self.format,
            "global_compression_ratio": None,
            "ignore": list(IGNORE),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": COMPRESSED_TENSORS_VERSION,
        }


def _dynamic_activations(strategy: str, group_size: int | None = None) -> dict[str, Any]:
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": True,
        "group_size": group_size,
        "num_bits": 8,
        "observer": None,
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }


SCHEMES: dict[str, CompressedScheme] = {
    scheme.save_method: scheme
    for scheme in (
        CompressedScheme(
            "fp8",
            "FP8_DYNAMIC",
            "float",
            8,
            "channel",
            format="float-quantized",
            input_activations=_dynamic_activations("token"),
        ),
        CompressedScheme(
            "fp8_block",
            "FP8_BLOCK",
            "float",
            8,
            "block",
            block=(128, 128),
            format="float-quantized",
            input_activations=_dynamic_activations("group", 128),
        ),
        CompressedScheme("w8a16", "W8A16", "int", 8, "group", group_size=128),
        CompressedScheme("w4a16", "W4A16", "int", 4, "group", group_size=128),
        CompressedScheme("w4a16_asym", "W4A16_ASYM", "int", 4, "group", group_size=128, symmetric=False),
        CompressedScheme(
            "nvfp4a16",
            "NVFP4A16",
            "float",
            4,
            "tensor_group",
            group_size=16,
            scale_dtype="float8_e4m3fn",
            format="nvfp4-pack-quantized",
        ),
        CompressedScheme(
            "mxfp4a16",
            "MXFP4A16",
            "float",
            4,
            "group",
            group_size=32,
            scale_dtype="e8m0",
            format="mxfp4-pack-quantized",
        ),
    )
}

# Unsloth's other quantized save methods: their activation scales come from data, which a save
# from weights alone does not have.
NEEDS_CALIBRATION = {
    "fp8_static": "FP8 with static per-tensor activation scales",
    "w8a8": "int8 weights with static int8 activation scales",
    "int8": "int8 weights with static int8 activation scales (W8A8)",
    "nvfp4": "NVFP4 weights with calibrated FP4 activation global scales",
}


def calibration_refusal(save_method: str) -> str | None:
    """Why ``save_method`` cannot be saved from weights alone, or None when that is not the reason."""
    what = NEEDS_CALIBRATION.get(save_method)
    if what is None:
        return None
    return (
        f"save_method={save_method!r} ({what}) needs calibration data to set its activation scales, which "
        "fastsave does not take yet. Use a data-free scheme: "
        + ", ".join(repr(name) for name in SCHEMES)
        + " (e.g. 'fp8': per-channel FP8 weights with dynamic per-token activations), or run "
        "llm-compressor's oneshot with a calibration dataset on a 'merged_16bit' save"
    )
