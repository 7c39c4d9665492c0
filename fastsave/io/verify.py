"""Re-read a saved directory: every shard header against the index, the file sizes and each other.

The light check (run on every save before its switch, and by ``fastsave verify DIR``) reads only
headers and small files. ``checksums=True`` (``fastsave verify DIR --checksums``) also re-hashes
every shard's data and compares it with the checksums recorded when it was written (the CRC-32 of
each 64 MiB block; the sha256 that older fastsave versions recorded is checked too).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastsave.io.checksums import CRC32_KEY, SHA256_KEY, compare_recorded
from fastsave.io.format import DTYPE_SIZES, read_safetensors_header
from fastsave.io.names import is_index_name, is_weight_file_name, variant_of
from fastsave.io.ownership import (
    ADAPTER,
    ADAPTER_CONFIG,
    GGUF,
    MERGED,
    adapter_files,
)
from fastsave.io.switch import JOURNAL_NAME


@dataclass
class VerifyReport:
    """What verifying a directory found."""

    directory: Path
    kind: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    tensors: int = 0
    data_bytes: int = 0
    digests_checked: int = 0

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def summary(self) -> str:
        """One paragraph for a person: what was checked, and every problem."""
        what = {MERGED: "merged checkpoint", ADAPTER: "LoRA adapter", GGUF: "GGUF export"}.get(
            self.kind or "", "directory"
        )
        lines = [
            f"{self.directory}: {what}, {self.shards} weight file(s), {self.tensors} tensors, "
            f"{self.data_bytes / 1e9:.3f} GB of tensor data"
            + (f", the checksums of {self.digests_checked} checked" if self.digests_checked else "")
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append("  OK" if self.ok else f"  {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _json_object(path: Path, report: VerifyReport) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        report.problems.append(f"{path.name} is missing")
        return None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        report.problems.append(f"{path.name} is not readable JSON ({error})")
        return None
    if not isinstance(value, dict):
        report.problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def check_safetensors_file(path: Path, report: VerifyReport) -> dict | None:
    """Parse ``path``'s header and check every tensor's byte range against the file; the header."""
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as error:
        report.problems.append(f"{path.name}: {error}")
        return None
    start = header.pop("__header_bytes__")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            size = DTYPE_SIZES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            report.problems.append(f"{path.name}: tensor {name!r} has an unreadable header entry")
            continue
        if end - begin != math.prod(shape) * size:
            report.problems.append(
                f"{path.name}: tensor {name!r} spans {end - begin} bytes, its shape needs {math.prod(shape) * size}"
            )
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            report.problems.append(
                f"{path.name}: tensor {name!r} starts at byte {begin}, expected {position}"
            )
        position = max(position, end)
    data_size = os.path.getsize(path) - start
    if position != data_size:
        report.problems.append(
            f"{path.name}: the header describes {position} bytes of data, the file holds {data_size}"
            + (" (truncated: an interrupted write?)" if data_size < position else "")
        )
    report.shards += 1
    report.tensors += len(spans)
    report.data_bytes += position
    return header


def _recorded(metadata: dict) -> tuple[str, object] | None:
    """The checksum key a fastsave header or index metadata holds, and its value."""
    for key in (CRC32_KEY, SHA256_KEY):
        if key in metadata:
            return key, metadata[key]
    return None


def _check_digest(path: Path, recorded: object, report: VerifyReport, where: str) -> None:
    if not recorded:
        report.problems.append(f"{path.name}: no checksum recorded ({where}): the write did not finish")
        return
    report.digests_checked += 1
    for problem in compare_recorded(path, recorded):
        report.problems.append(f"{path.name} ({where}): {problem}")


def _verify_merged(directory: Path, report: VerifyReport, checksums: bool) -> None:
    _json_object(directory / "config.json", report)
    names = os.listdir(directory)
    variants = {variant_of(n) for n in names if is_weight_file_name(n) or is_index_name(n)}
    if not variants:
        report.problems.append("no weight files (model.safetensors, or shards and their index)")
    for variant in sorted(variants, key=lambda v: v or ""):  # transformers' variant=: each on its own
        _verify_weights(directory, report, checksums, variant)


def _verify_weights(directory: Path, report: VerifyReport, checksums: bool, variant: str | None) -> None:
    names = sorted(os.listdir(directory))
    weight_files = [n for n in names if is_weight_file_name(n, variant)]
    index_names = sorted(
        (n for n in names if is_index_name(n, variant)), key=lambda n: not n.startswith("model.")
    )
    index_path = directory / index_names[0] if index_names else None
    if index_path is None:
        if len(weight_files) != 1:
            report.problems.append(
                f"no index, and {len(weight_files)} weight files ({', '.join(weight_files) or 'none'}): "
                "expected one file (model.safetensors, or model.<variant>.safetensors)"
            )
        for name in weight_files:
            if name.endswith(".safetensors"):
                header = check_safetensors_file(directory / name, report)
                recorded = (header or {}).get("__metadata__", {}) or {}
                if checksums and header is not None:
                    found = _recorded(recorded)
                    if found is not None:
                        _check_digest(directory / name, found[1], report, "its header")
                    else:
                        report.notes.append(f"{name}: no checksum recorded (not written by fastsave)")
            else:
                report.shards += 1
                report.notes.append(f"{name}: legacy torch .bin, checked for presence only")
        return
    index = _json_object(index_path, report)
    if index is None:
        return
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        report.problems.append(f"{index_path.name} has no weight_map")
        return
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(str(shard), set()).add(tensor)
    stray = sorted(set(weight_files) - set(by_shard))
    if stray:
        report.problems.append(
            f"weight files not named by {index_path.name} (stale, or loaded instead): {', '.join(stray)}"
        )
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    found = _recorded(metadata)
    key, digests = found if found is not None and isinstance(found[1], dict) else (CRC32_KEY, None)
    total = 0
    for shard, names in sorted(by_shard.items()):
        path = directory / shard
        if "/" in shard or not path.is_file():
            report.problems.append(f"{index_path.name} names {shard!r}, which is not in the directory")
            continue
        if not shard.endswith(".safetensors"):
            report.shards += 1
            report.tensors += len(names)
            continue
        header = check_safetensors_file(path, report)
        if header is None:
            continue
        in_header = set(header) - {"__metadata__"}
        if in_header != names:
            missing, extra = sorted(names - in_header), sorted(in_header - names)
            report.problems.append(
                f"{shard}: the index maps {len(missing)} tensor(s) to it that it lacks {missing[:3]} and it holds "
                f"{len(extra)} the index does not map there {extra[:3]}"
            )
        total += sum(
            int(e["data_offsets"][1]) - int(e["data_offsets"][0])
            for k, e in header.items()
            if k != "__metadata__"
        )
        own = (header.get("__metadata__") or {}).get(key)
        if digests is not None:
            if digests.get(shard) != own:
                report.problems.append(f"{shard}: the checksums in its header and in the index differ")
            if checksums:
                _check_digest(path, digests.get(shard), report, "the index")
        elif checksums:
            report.notes.append(f"{shard}: no checksum recorded in the index (not written by fastsave)")
    declared = metadata.get("total_size")
    if (
        index_path.name.startswith("model.safetensors")
        and isinstance(declared, int)
        and declared != total
        and not report.problems
    ):
        report.problems.append(f"{index_path.name} says total_size {declared}, the shards hold {total} bytes")


def _verify_adapter(directory: Path, report: VerifyReport) -> None:
    # peft writes the default adapter at the top, every other one into a sub-folder named after it
    folders = [directory] if adapter_files(directory) else []
    folders += [p for p in sorted(directory.iterdir()) if p.is_dir() and (p / ADAPTER_CONFIG).is_file()]
    if not folders:
        report.problems.append(f"{ADAPTER_CONFIG} is missing")
    for folder in folders:
        where = "" if folder == directory else f"{folder.name}/"
        if _json_object(folder / ADAPTER_CONFIG, report) is None:
            continue
        if (folder / "adapter_model.safetensors").is_file():
            check_safetensors_file(folder / "adapter_model.safetensors", report)
        elif (folder / "adapter_model.bin").is_file():
            report.shards += 1
            report.notes.append(f"{where}adapter_model.bin: legacy torch .bin, checked for presence only")
        else:
            report.problems.append(f"{where}adapter_model.safetensors (or .bin) is missing")


def verify_checkpoint(
    directory: str | os.PathLike, checksums: bool = False, kind: str | None = None
) -> VerifyReport:
    """Check that the checkpoint in ``directory`` reads back as written.

    ``kind``: ADAPTER or MERGED when known (a save checking its staging directory); None guesses
    from the files. Returns a report; ``report.ok`` is False with every problem listed.
    """
    directory = Path(directory)
    report = VerifyReport(directory, kind)
    if not directory.is_dir():
        report.problems.append("not a directory")
        return report
    if (directory / JOURNAL_NAME).exists():
        report.problems.append(
            f"{JOURNAL_NAME}: a save was interrupted while switching files in; the next save into this "
            "directory completes or rolls it back"
        )
    has_adapter = bool(adapter_files(directory))
    has_weights = any(is_weight_file_name(n) or is_index_name(n) for n in os.listdir(directory))
    if kind is None:
        if has_adapter and has_weights:
            report.problems.append(
                "holds both a LoRA adapter and merged weights: it loads as neither reliably"
            )
        kind = ADAPTER if has_adapter and not has_weights else MERGED if has_weights else None
        report.kind = kind
    if kind is None:
        report.problems.append("holds no checkpoint (no model weights, no adapter)")
    elif kind == ADAPTER:
        _verify_adapter(directory, report)
    elif kind == GGUF:  # the export checks each file against the checkpoint itself (fastsave.export)
        if not any(name.endswith(".gguf") for name in os.listdir(directory)):
            report.problems.append("holds no .gguf file")
    else:
        _verify_merged(directory, report, checksums)
    return report
