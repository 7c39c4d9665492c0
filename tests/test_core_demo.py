"""`fastsave demo` runs the whole job end to end and checks itself."""

from __future__ import annotations

import json
import tempfile

from fastsave.cli import main


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the demo makes its temporary directory
    assert main(["demo", str(tmp_path / "demo-out"), "--steps", "3"]) == 0
    # the tiny base model it built is gone with its directory; the output is elsewhere (torch may
    # leave caches of its own there)
    assert list(scratch.glob("fastsave-demo-*")) == []
    printed = capsys.readouterr().out
    assert "[bit-exact]" in printed
    assert "argmax agreement" in printed
    config = json.loads((tmp_path / "demo-out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "demo-out" / "tokenizer.json").exists()


def test_the_demo_without_an_output_directory_keeps_only_the_merged_checkpoint(tmp_path, monkeypatch):
    from fastsave.demo import run_demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = run_demo(train_steps=1)
    (workdir,) = tmp_path.glob("fastsave-demo-*")
    assert [p.name for p in workdir.iterdir()] == ["merged"]  # the base model it built is gone
    assert report.output_dir == str(workdir / "merged")
    assert (workdir / "merged" / "config.json").exists()
