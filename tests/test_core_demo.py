"""`fastsave demo` runs the whole job end to end and checks itself."""

from __future__ import annotations

import json

from fastsave.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo-out"), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "[bit-exact]" in printed
    assert "argmax agreement" in printed
    config = json.loads((tmp_path / "demo-out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "demo-out" / "tokenizer.json").exists()
