"""Checksums of each shard's data, computed while it is written and recorded inside the shard.

What is recorded: the CRC-32 (zlib's) of every 64 MiB block of the shard's data section (every byte
after the header), under the key :data:`CRC32_KEY` of the safetensors header's ``__metadata__``,
as ``"<block bytes>:<8 hex digits>,<8 hex digits>,..."`` (one per block, the last one shorter), and,
for a sharded save, also in the index's ``metadata`` (by shard name). So every shard checks itself,
also when copied or downloaded alone, and a single-file save needs no extra file. The header is
checked by parsing it against the file size and the index (``fastsave verify``).

Why CRC-32 and not sha256 (which fastsave recorded before, key :data:`SHA256_KEY`, still verified):
the checksum is there to find bytes that changed after the save (a bad disk, an interrupted copy or
download, a truncated file), not to resist an attacker (who could rewrite a digest stored in the same
file anyway). CRC-32 finds every change confined to 32 consecutive bits and any other change of a
block with probability 1 - 2^-32, and a change in k blocks with 1 - 2^-32k. ISA-L (the ``isal``
package) computes it at about 37 GB/s on one core, zlib (its fallback, the same values) at 7, sha256
at 2: on two cores sha256 was a quarter of the save's CPU time. Both release the GIL. A mismatch
also says which 64 MiB of the file differ.

Before the data is written, the header holds a placeholder of the same length (``x`` digits, which
no checksum has); the header is written once the data is (fastsave.io.direct_file).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from pathlib import Path

try:  # ISA-L's CRC-32 (carry-less multiplication): zlib's values at 37 GB/s instead of 7 on one core
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a platform without an isal wheel: the same values from zlib
    from zlib import crc32 as _crc32

CRC32_KEY = "fastsave_crc32"
SHA256_KEY = "fastsave_sha256"  # what saves of fastsave 0.x before the CRC-32 recorded; verified still
SHA256_PLACEHOLDER = "0" * 64
CHECKSUM_BLOCK = 64 * 2**20  # bytes of data per CRC-32
_UNWRITTEN = "x" * 8
_READ_CHUNK = 8 * 2**20
_RECORDED = re.compile(r"^([1-9][0-9]*):((?:[0-9a-fx]{8})(?:,[0-9a-fx]{8})*)?$")


def block_count(data_bytes: int, block: int = CHECKSUM_BLOCK) -> int:
    """The number of checksummed blocks in ``data_bytes`` bytes of data."""
    return -(-data_bytes // block)


def placeholder(data_bytes: int, block: int = CHECKSUM_BLOCK) -> str:
    """The recorded value's stand-in while the data is written: the same length, no hex digits."""
    return f"{block}:" + ",".join([_UNWRITTEN] * block_count(data_bytes, block))


def parse_recorded(value: object) -> tuple[int, list[int | None]] | None:
    """The block size and the CRC-32 of each block from a recorded value (None: an unwritten
    block); None when the value is not a CRC-32 record."""
    if not isinstance(value, str):
        return None
    match = _RECORDED.match(value)
    if match is None:
        return None
    digits = match.group(2).split(",") if match.group(2) else []
    if any("x" in d and d != _UNWRITTEN for d in digits):
        return None
    return int(match.group(1)), [None if d == _UNWRITTEN else int(d, 16) for d in digits]


class BlockCrc32:
    """The CRC-32 of each ``block`` bytes of a stream fed in order (computed without the GIL)."""

    def __init__(self, block: int = CHECKSUM_BLOCK) -> None:
        self.block = block
        self.values: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current block seen

    def update(self, data: memoryview | bytes) -> None:
        """Feed the next bytes of the stream."""
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block - self._filled)
            self._crc = _crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == self.block:
                self.values.append(self._crc)
                self._crc, self._filled = 0, 0

    def blocks(self) -> list[int]:
        """The CRC-32 of every block fed so far, the last one possibly short."""
        return self.values + ([self._crc] if self._filled else [])

    def recorded(self) -> str:
        """The value to record for everything fed."""
        return f"{self.block}:" + ",".join(f"{v:08x}" for v in self.blocks())


def _data_section(path: Path) -> Iterator[bytes]:
    """The data section of a safetensors file (every byte after its header), in chunks."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length)
        while chunk := handle.read(_READ_CHUNK):
            yield chunk


def data_crc32(path: Path, block: int) -> tuple[list[int], int]:
    """The CRC-32 of each ``block`` bytes of a safetensors file's data section, and its length."""
    crc = BlockCrc32(block)
    size = 0
    for chunk in _data_section(path):
        crc.update(chunk)
        size += len(chunk)
    return crc.blocks(), size


def data_sha256(path: Path) -> str:
    """sha256 of the data section of a safetensors file (what older fastsave saves recorded)."""
    digest = hashlib.sha256()
    for chunk in _data_section(path):
        digest.update(chunk)
    return digest.hexdigest()


def compare_recorded(path: Path, recorded: object) -> list[str]:
    """What differs between a shard's data and the checksums recorded for it (empty: it matches).

    ``recorded``: a CRC-32 record (:data:`CRC32_KEY`) or an older sha256 digest (:data:`SHA256_KEY`).
    """
    parsed = parse_recorded(recorded)
    if parsed is None:
        if isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded):
            if recorded == SHA256_PLACEHOLDER:
                return ["no sha256 recorded: the write did not finish"]
            actual = data_sha256(path)
            return [] if actual == recorded else [f"sha256 of the data is {actual}, recorded {recorded}"]
        return [f"the recorded checksum {str(recorded)[:80]!r} is not one fastsave writes"]
    block, expected = parsed
    if any(value is None for value in expected):
        return ["no checksum recorded (a placeholder): the write did not finish"]
    actual, size = data_crc32(path, block)
    if len(actual) != len(expected):
        return [f"the data is {size} bytes, the checksums cover {len(expected)} block(s) of {block} bytes"]
    return [
        f"bytes {i * block}-{min(size, (i + 1) * block)} of the data changed: CRC-32 {a:08x}, recorded {e:08x}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True))
        if a != e
    ]
