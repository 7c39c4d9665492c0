"""fastsave verify, the checksums recorded at write time, and the NaN/Inf check on the way to disk.

Oracles: zlib's CRC-32 (and hashlib's sha256, for what older versions recorded) over the bytes
after the header (parsed here with struct and json, not with fastsave's reader), safetensors' own
reader and writer, torch.isfinite.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fastsave
from fastsave.cli import main
from fastsave.errors import NonFiniteError
from fastsave.io.finite import check_finite
from fastsave.io.verify import verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


@pytest.fixture
def saved(qlora_model, tiny_tokenizer, tmp_path):
    """A sharded and a single-file merged save."""
    model = qlora_model()
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    fastsave.save_pretrained_merged(model, sharded, tiny_tokenizer, max_shard_size="60KB")
    fastsave.save_pretrained_merged(model, single, tiny_tokenizer)
    return sharded, single


def _crc32_record(data: bytes, block: int = 64 * 2**20) -> str:
    return f"{block}:" + ",".join(
        f"{zlib.crc32(data[i : i + block]):08x}" for i in range(0, len(data), block)
    )


def test_crc32_of_each_shard_is_recorded_in_the_shard_and_the_index(saved):
    sharded, single = saved
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    recorded = index["metadata"]["fastsave_crc32"]
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert sorted(recorded) == shards and len(shards) > 3
    for path in [*(sharded / s for s in shards), single / "model.safetensors"]:
        header, data = _header_and_data(path)
        digest = _crc32_record(data)
        assert header["__metadata__"]["fastsave_crc32"] == digest, path.name
        assert (path.stat().st_size - len(data)) % 4096 == 0  # the data starts page-aligned
        if path.parent == sharded:
            assert recorded[path.name] == digest
        with safe_open(path, framework="pt") as handle:  # safetensors itself still reads it
            assert handle.metadata()["format"] == "pt" and handle.metadata()["fastsave_crc32"] == digest
    assert index["metadata"]["total_size"] == sum(len(_header_and_data(sharded / s)[1]) for s in shards)


def test_a_checkpoint_with_the_sha256_older_versions_recorded_still_verifies(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    path = directory / "model.safetensors"
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 7, dtype=torch.bfloat16)}
    save_file(tensors, path, metadata={"format": "pt", "fastsave_sha256": "0" * 64})
    digest = hashlib.sha256(_header_and_data(path)[1]).hexdigest()
    save_file(tensors, path, metadata={"format": "pt", "fastsave_sha256": digest})
    report = verify_checkpoint(directory, checksums=True)
    assert report.ok and report.digests_checked == 1, report.summary()
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    report = verify_checkpoint(directory, checksums=True)
    assert not report.ok and "sha256 of the data is" in report.problems[0], report.summary()


def test_a_crc32_mismatch_names_the_block_that_changed(tmp_path):
    from safetensors.torch import save_file

    from fastsave.io.checksums import compare_recorded

    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(5000, dtype=torch.float32)}  # 20000 bytes: blocks of 4096
    save_file(tensors, path)
    data = _header_and_data(path)[1]
    save_file(tensors, path, metadata={"fastsave_crc32": _crc32_record(data, 4096)})
    assert compare_recorded(path, _crc32_record(data, 4096)) == []
    raw = bytearray(path.read_bytes())
    raw[len(raw) - len(data) + 9000] ^= 0x80  # in the third block
    path.write_bytes(bytes(raw))
    problems = compare_recorded(path, _crc32_record(data, 4096))
    assert len(problems) == 1 and problems[0].startswith("bytes 8192-12288 of the data changed"), problems
    unfinished = "4096:" + ",".join(["xxxxxxxx"] * 5)
    assert "did not finish" in compare_recorded(path, unfinished)[0]
    assert "not one fastsave writes" in compare_recorded(path, "4096:1234")[0]


def test_verify_a_good_save_and_the_command(saved, capsys):
    sharded, _ = saved
    for directory in saved:
        report = verify_checkpoint(directory, checksums=True)
        assert report.ok and report.kind == "merged", report.summary()
        assert report.digests_checked == report.shards > 0 and report.tensors == 21
    assert main(["verify", str(sharded), "--checksums"]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_finds_each_kind_of_damage(saved, tmp_path, capsys):
    sharded, single = saved
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit in the data: only the checksum sees it
    shard.write_bytes(bytes(raw))
    assert verify_checkpoint(sharded).ok
    report = verify_checkpoint(sharded, checksums=True)
    assert not report.ok and f"{shard.name} (the index): bytes 0-" in report.problems[0], report.problems
    assert main(["verify", str(sharded), "--checksums"]) == 1
    assert "PROBLEM" in capsys.readouterr().out

    shard.write_bytes(bytes(raw[:-10]))  # truncated
    assert any("truncated" in p for p in verify_checkpoint(sharded).problems)
    (single / "model-00002-of-00002.safetensors").write_bytes(b"x")  # stale, beside a single file
    assert any("expected one file" in p for p in verify_checkpoint(single).problems)
    (single / "model-00002-of-00002.safetensors").unlink()
    (sharded / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    assert any("not named by" in p for p in verify_checkpoint(sharded).problems)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify_checkpoint(empty).problems == ["holds no checkpoint (no model weights, no adapter)"]


def test_verify_checkpoints_fastsave_did_not_write(qlora_model, tmp_path):
    model = qlora_model()
    model.save_pretrained(tmp_path / "adapter")
    report = verify_checkpoint(tmp_path / "adapter", checksums=True)
    assert report.ok and report.kind == "adapter", report.summary()
    model.get_base_model().save_pretrained(tmp_path / "plain")  # transformers' own (4-bit) save
    report = verify_checkpoint(tmp_path / "plain", checksums=True)
    assert report.ok and any("no checksum recorded" in n for n in report.notes), report.summary()


_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@pytest.mark.parametrize("counted_in_c", [True, False], ids=["C count", "aminmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_agrees_with_isfinite(dtype, counted_in_c, monkeypatch):
    from fastsave.io import finite

    if counted_in_c and finite._library() is None:
        pytest.skip("fastsave's C kernels could not be built here (no C compiler)")
    if not counted_in_c:  # the path taken where the kernels cannot be built
        monkeypatch.setattr(finite, "_library", lambda: None)
    gen = torch.Generator().manual_seed(0)
    for size in (1, 3, 64, 1000, 65537):
        for value in ("nan", "inf", "-inf", "negative nan", "none"):
            tensor = torch.randn(size, generator=gen).to(dtype)
            position = int(torch.randint(0, size, (1,), generator=gen))
            if value == "negative nan":  # all bits set: sign, exponent and mantissa
                tensor.view(_INT_VIEW[dtype])[position] = -1
            elif value != "none":
                tensor[position] = float(value)
            if bool(torch.isfinite(tensor).all()):
                assert value == "none"
                check_finite(tensor, "t")
            else:
                with pytest.raises(NonFiniteError, match="'t'"):
                    check_finite(tensor, "t")
    check_finite(torch.zeros(0, dtype=dtype), "empty")
    check_finite(torch.tensor([1, 2], dtype=torch.int64), "integers")


def test_the_c_count_of_nan_and_inf_agrees_with_isfinite_on_every_16_bit_pattern():
    """Every bit pattern of bfloat16 and float16 (NaN payloads of both signs, infinities, the largest
    finite values, subnormals, zeros), and float32 patterns around the exponent field's edges, in
    lengths that end inside a vector and cross the kernel's 2**20-value runs."""
    from fastsave.io import finite

    if finite._library() is None:
        pytest.skip("fastsave's C kernels could not be built here (no C compiler)")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = every.view(dtype)
        assert finite.count_nonfinite(values) == int((~torch.isfinite(values)).sum()) > 0
        for length in (1, 7, 15, 17, 33, 1000):
            part = values[-length:].contiguous()
            assert finite.count_nonfinite(part) == int((~torch.isfinite(part)).sum())
    gen = torch.Generator().manual_seed(1)
    mantissas = torch.randint(0, 2**23, (4096,), generator=gen, dtype=torch.int64)
    exponents = torch.tensor([0, 1, 254, 255], dtype=torch.int64).repeat(1024)
    signs = torch.randint(0, 2, (4096,), generator=gen, dtype=torch.int64) << 31
    bits = (signs | exponents << 23 | mantissas).to(torch.int64)
    floats = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    assert finite.count_nonfinite(floats) == int((~torch.isfinite(floats)).sum()) > 0
    long = torch.zeros(2**21 + 5, dtype=torch.bfloat16)
    for position, value in zip((0, 2**20 - 1, 2**20, 2**21 + 4), ("nan", "inf", "-inf", "nan"), strict=True):
        long[position] = float(value)
    assert finite.count_nonfinite(long) == 4
    assert finite.count_nonfinite(long[::2]) is None  # not contiguous: torch's aminmax checks it
    assert finite.count_nonfinite(torch.ones(3, dtype=torch.float64)) is None


def test_a_counted_tensor_is_skipped_by_its_next_check_only():
    from fastsave.io import finite

    counted = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)
    same_values = counted.clone()
    assert finite.counted_finite(counted) is counted
    check_finite(counted, "counted")  # vouched for: not read (a pass that counted would have raised)
    with pytest.raises(NonFiniteError, match="'counted'"):
        check_finite(counted, "counted")  # the vouching is used up
    finite.counted_finite(counted)
    with pytest.raises(NonFiniteError, match="'other'"):
        check_finite(same_values, "other")  # another tensor, the same values: read
    del counted
    assert not finite._counted  # an entry leaves with its tensor
