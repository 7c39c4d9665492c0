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

import torch

from fastsave._version import __version__

# torch dtype -> safetensors dtype code, for every dtype fastsave writes or reads as a tensor
SAFETENSORS_DTYPES = {
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
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
DTYPE_SIZES = {
    code: torch.empty((), dtype=dtype).element_size() for dtype, code in SAFETENSORS_DTYPES.items()
}
# codes fastsave does not read as tensors but must size when it verifies a checkpoint another
# library wrote into a save (torchao's float8 weights, unsigned ints)
DTYPE_SIZES.update({"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8})
# codes of floating-point data (the float8 ones too, which fastsave does not read as tensors)
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
# The key fastsave puts into the metadata of the shards and the index it writes.
FASTSAVE_METADATA_KEY = "fastsave"


def fastsave_version() -> str:
    """The fastsave version recorded in what it writes (``fastsave._version``, the one place it is kept,
    so a source tree records it too)."""
    return __version__


def encode_header(tensors: Iterable[Any], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header for ``tensors`` (each with name, dtype, shape, nbytes)
    stored back to back, padded so that the data starts 8-aligned, as safetensors writes it.

    Raises:
        ValueError: a tensor's dtype is one safetensors cannot store.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {tensor.name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        header[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
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
