"""The safetensors format as fastsave reads and writes it: dtype codes, the header, the metadata.

A safetensors file is an 8-byte little-endian header length, a JSON header giving every tensor's
dtype, shape and byte range (and a ``__metadata__`` of strings), then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastsave._version import __version__

# safetensors dtype code -> bytes per element, for every code fastsave writes, reads or verifies
# (the float8 and unsigned ones only verified: torchao's weights in a save_pretrained_torchao output)
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """``SAFETENSORS_DTYPES`` (torch dtype -> code, for every dtype fastsave writes or reads as a
    tensor) and ``TORCH_DTYPES`` (the reverse), built on first use: reading a header (``fastsave
    verify``) needs no torch."""
    if name in ("SAFETENSORS_DTYPES", "TORCH_DTYPES"):
        if name in globals():  # built already (this module's own calls come here every time)
            return globals()[name]
        import torch

        codes = {
            torch.float64: "F64",
            torch.float32: "F32",
            torch.float16: "F16",
            torch.bfloat16: "BF16",
            torch.int64: "I64",
            torch.int32: "I32",
            torch.int16: "I16",
            torch.int8: "I8",
            torch.uint8: "U8",
            torch.bool: "BOOL",
            torch.float8_e4m3fn: "F8_E4M3",  # compressed-tensors' FP8 weights
        }
        globals()["SAFETENSORS_DTYPES"] = codes
        globals()["TORCH_DTYPES"] = {code: dtype for dtype, code in codes.items()}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# codes of floating-point data (the float8 ones too, which fastsave does not read as tensors)
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
# The key fastsave puts into the metadata of the shards and the index it writes.
FASTSAVE_METADATA_KEY = "fastsave"


def fastsave_version() -> str:
    """The fastsave version recorded in what it writes (``fastsave._version``, the one place it is kept,
    so a source tree records it too)."""
    return __version__


def encode_header(tensors: Iterable[Any], metadata: dict[str, str], align: int = 8) -> bytes:
    """The 8-byte length and the JSON header for ``tensors`` (each with name, dtype, shape, nbytes)
    stored back to back, padded with spaces so that the data starts at a multiple of ``align`` bytes
    (safetensors itself pads to 8; its JSON reader skips any trailing whitespace).

    Raises:
        ValueError: a tensor's dtype is one safetensors cannot store.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    codes = __getattr__("SAFETENSORS_DTYPES")  # torch imported on first use only
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in codes:
            raise ValueError(
                f"tensor {tensor.name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        end = offset + tensor.nbytes
        header[tensor.name] = {
            "dtype": codes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % align)
    return struct.pack("<Q", len(encoded)) + encoded


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, with ``__header_bytes__`` (8 + its length) added.

    Raises:
        ValueError: the file is too short or its header is not a safetensors header.
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: header length {length} is not plausible")
        raw = handle.read(length)
    if len(raw) < length:
        raise ValueError(f"{path.name} ends inside its header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path.name}: the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    header["__header_bytes__"] = 8 + length
    return header
