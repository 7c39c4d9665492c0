"""Sources read by rows give the bits of the whole tensor, checked against the backends themselves."""

from __future__ import annotations

import dataclasses

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from process_maps import vm_data

from fastsave.sources.dense import DenseSource
from fastsave.sources.nf4_roundtrip import Nf4RoundTripSource
from fastsave.sources.settings_4bit import Quant4bitSettings


@pytest.mark.parametrize(
    ("shape", "quant_type", "double_quant", "blocksize", "stored"),
    [
        ((300, 512), "nf4", True, 64, torch.bfloat16),
        ((96, 256), "fp4", True, 128, torch.bfloat16),
        ((1000, 128), "nf4", False, 32, torch.float32),  # stored float32, loaded (cast) as bfloat16
        ((64, 4096), "nf4", True, 256, torch.bfloat16),
    ],
)
def test_nf4_round_trip_by_rows_equals_bitsandbytes_on_the_whole_tensor(
    shape, quant_type, double_quant, blocksize, stored
):
    """Double quantization is global (mean of every absmax): the row reader's first pass must reproduce it."""
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(stored)
    codes, state = bnb_functional.quantize_4bit(
        weight.to(torch.bfloat16),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    state.dtype = torch.float32
    expected = bnb_functional.dequantize_4bit(codes, state)  # bitsandbytes on the whole tensor, float32

    source = Nf4RoundTripSource(
        DenseSource(weight), Quant4bitSettings(quant_type, blocksize, double_quant), torch.bfloat16, False
    )
    reader = source.row_reader()
    assert reader is not None
    rows = shape[0]
    for step in (7, 32, rows):
        by_rows = torch.cat([reader.read(i, min(rows, i + step)) for i in range(0, rows, step)])
        assert torch.equal(by_rows, expected), step
    assert torch.equal(source.float32(), expected)


def test_the_first_pass_holds_no_more_than_a_merges_row_block(monkeypatch):
    """The double-quantized round trip's first pass reads the rows a few at a time, each read no
    larger than what a merge's row block is admitted for, and still gives bitsandbytes' bits."""
    from fastsave.merge.assemble import BLOCK_BYTES
    from fastsave.merge.row_blocks import block_working_bytes, rows_per_block
    from fastsave.sources import nf4_roundtrip

    assert (
        block_working_bytes(2048, rows_per_block(2048, 1, BLOCK_BYTES), False)
        == nf4_roundtrip.FIRST_PASS_BYTES
    )
    torch.manual_seed(3)
    weight = (torch.randn(50, 512) * torch.rand(50, 1)).to(torch.bfloat16)
    codes, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    state.dtype = torch.float32
    expected = bnb_functional.dequantize_4bit(codes, state)
    # three rows a read: their stored bytes, twice over (the torch path's absolute values too)
    monkeypatch.setattr(nf4_roundtrip, "FIRST_PASS_BYTES", 3 * 2 * 2 * 512)
    inner = DenseSource(weight)
    reads = []
    rows_reader = inner.row_reader

    def recorded():
        reader = rows_reader()
        stored = reader.read_stored or reader.read
        return dataclasses.replace(reader, read_stored=lambda i, j: reads.append(j - i) or stored(i, j))

    monkeypatch.setattr(inner, "row_reader", recorded)
    source = Nf4RoundTripSource(inner, Quant4bitSettings("nf4", 64, True), torch.bfloat16, False)
    reader = source.row_reader()
    first_pass = list(reads)
    assert sum(first_pass) == 50 and max(first_pass) == 3
    assert torch.equal(torch.cat([reader.read(i, min(50, i + 16)) for i in range(0, 50, 16)]), expected)


def test_nf4_round_trip_of_a_conv1d_weight_is_not_read_by_rows():
    """A Conv1D weight is quantized transposed: its rows are not the quantized rows."""
    source = Nf4RoundTripSource(
        DenseSource(torch.randn(64, 128)), Quant4bitSettings(), torch.bfloat16, conv1d=True
    )
    assert source.row_reader() is None


def test_checkpoint_reader_equals_safetensors_and_maps_no_file(tmp_path):
    """Tensors and row ranges read by positional reads equal safetensors' own load; the file is never
    memory-mapped (a private writable map as large as the file counts against RLIMIT_DATA)."""
    from safetensors.torch import load_file, save_file

    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(37, 11, generator=generator).to(torch.bfloat16),
        "h": torch.randn(4, 3, 2, generator=generator).to(torch.float16),
        "ids": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "mask": torch.rand(3, 2, generator=generator) > 0.5,
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = SafetensorsCheckpoint(tmp_path)
    got = {name: checkpoint.get(name) for name in tensors}
    rows = [checkpoint.rows("w", 5, 19), checkpoint.rows("h", 1, 3), checkpoint.rows("w", 30, 99)]
    with open("/proc/self/maps") as maps:
        assert str(tmp_path / "model.safetensors") not in maps.read()
    reference = load_file(tmp_path / "model.safetensors")
    for name, expected in reference.items():
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    assert torch.equal(rows[0], reference["w"][5:19])
    assert torch.equal(rows[1], reference["h"][1:3])
    assert torch.equal(rows[2], reference["w"][30:])


def test_checkpoint_reader_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsCheckpoint(tmp_path).get("w")


def test_mapped_rows_are_read_only_file_pages_that_rlimit_data_does_not_count(tmp_path):
    """The round trip reads rows straight from the file's pages: a read-only shared mapping of just
    those rows (VmData, what RLIMIT_DATA bounds, does not grow by it), unmapped with the tensor."""
    import gc

    from safetensors.torch import load_file, save_file

    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4096, 1024, generator=generator).to(torch.bfloat16)  # 8 MiB
    save_file({"pad": torch.ones(3, dtype=torch.bfloat16), "w": weight}, tmp_path / "model.safetensors")
    path = str(tmp_path / "model.safetensors")
    checkpoint = SafetensorsCheckpoint(tmp_path)
    before = vm_data()
    rows = checkpoint.mapped_rows("w", 100, 4000)
    grown = vm_data() - before
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if path in line]
    assert mapped and all(line.split()[1] == "r--s" for line in mapped)
    assert grown < 1 << 20
    assert torch.equal(rows, load_file(path)["w"][100:4000])
    assert checkpoint.mapped_rows("w", 5, 5).shape == (0, 1024)
    del rows
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert path not in maps.read()


def test_a_row_reader_maps_a_window_at_a_time_and_its_blocks_outlive_it(tmp_path, monkeypatch):
    """A checkpoint row reader maps a window of the tensor (MAPPED_WINDOW_BYTES, or the read when
    larger) and maps anew only when a read falls outside it, forwards from the read or backwards
    ending at it; reads forwards, backwards, across the window's edge and larger than it give
    safetensors' own rows, and a block read earlier keeps its rows after the window moved on."""
    from safetensors.torch import load_file, save_file

    from fastsave.sources import safetensors_file

    weight = torch.randn(100, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    save_file({"w": weight}, tmp_path / "model.safetensors")
    expected = load_file(tmp_path / "model.safetensors")["w"]
    monkeypatch.setattr(safetensors_file, "MAPPED_WINDOW_BYTES", 10 * 64 * 2)  # 10 rows
    checkpoint = safetensors_file.SafetensorsCheckpoint(tmp_path)
    maps = []
    real = checkpoint.mapped_rows
    monkeypatch.setattr(checkpoint, "mapped_rows", lambda name, i, j: maps.append((i, j)) or real(name, i, j))
    read = checkpoint.source("w").row_reader().read_stored
    first = read(0, 4)
    reads = [
        (4, 8),
        (8, 10),
        (9, 13),
        (13, 15),
        (2, 5),
        (30, 55),
        (40, 45),
        (95, 120),
        (90, 95),
        (85, 90),
        (80, 85),
    ]
    for i, j in reads:
        assert torch.equal(read(i, j), expected[i : min(j, 100)]), (i, j)
    # forwards a window starts at the read, backwards it ends there (the NF4 round trip's first pass
    # reads a weight from its end)
    assert maps == [(0, 10), (9, 19), (0, 5), (30, 55), (95, 100), (85, 95), (75, 85)]
    assert torch.equal(first, expected[0:4])


def test_mapped_rows_of_a_truncated_file_are_refused_before_mapping(tmp_path):
    from safetensors.torch import save_file

    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    checkpoint = SafetensorsCheckpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        checkpoint.mapped_rows("w", 60, 64)


def test_row_merge_of_a_file_streams_blocks_that_the_next_block_does_not_overwrite(tmp_path):
    """The row merge reads every block into one buffer (the reader's read_into); the blocks it streams,
    kept together, still hold their own rows, in float32 (no cast to copy) as in bfloat16."""
    from safetensors.torch import save_file

    from fastsave.buffer_pool import pooled_buffers
    from fastsave.merge.row_blocks import RowMerge, stream_row_blocks
    from fastsave.sources.safetensors_file import SafetensorsCheckpoint

    weight = torch.randn(70, 33, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    save_file({"w": weight}, tmp_path / "model.safetensors")
    source = SafetensorsCheckpoint(tmp_path).source("w")
    reader = source.row_reader()
    assert reader.read_into is not None
    for dtype in (torch.float32, torch.bfloat16):
        with pooled_buffers():
            blocks = list(stream_row_blocks(RowMerge(source, reader, 16, [], dtype)))
        assert len(blocks) == 5
        assert torch.equal(torch.cat(blocks), weight.to(dtype))


def test_module_tensors_are_torchs_own_parameters_and_persistent_buffers():
    """module_tensors reads the module's dicts directly: the same names and objects as torch's
    named_parameters(recurse=False) and the persistent buffers of its state_dict, each once."""
    import torch
    from torch import nn

    from fastsave.sources import module_tensors

    module = nn.BatchNorm1d(4)
    module.register_buffer("scratch", torch.zeros(2), persistent=False)
    module.alias = module.weight  # the same parameter under a second name: listed once, as torch does
    module.register_parameter("missing", None)
    expected = [(n, id(p)) for n, p in module.named_parameters(recurse=False)]
    state = module.state_dict(keep_vars=True)
    expected += [(n, id(b)) for n, b in module.named_buffers(recurse=False) if n in state]
    assert [(t.attr, id(t.tensor)) for t in module_tensors(module)] == expected
    assert "scratch" not in [t.attr for t in module_tensors(module)]
