"""The command starts fast and quietly: ``fastsave --help``, ``fastsave verify`` and the argument
checks of ``fastsave merge`` import nothing heavy; the heavy imports of a merge do not print other
libraries' start-up chatter."""

from __future__ import annotations

import logging
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "safetensors.torch")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = result.stdout.strip().splitlines()[-1]
    return [name for name in line.removeprefix("HEAVY:").split(",") if name]


def test_help_verify_and_argument_checks_import_nothing_heavy(tmp_path):
    assert _imported_after("import fastsave, fastsave.cli") == []
    assert _imported_after("from fastsave.cli import build_parser; build_parser().format_help()") == []
    verify = f"from fastsave.cli import main; main(['verify', {str(tmp_path)!r}])"
    assert _imported_after(verify) == []
    bad_flag = (
        "from fastsave.cli import main\ntry:\n    main(['merge', 'a', 'b', '--save-method', 'nope'])\n"
        "except SystemExit:\n    pass"
    )
    assert _imported_after(bad_flag) == []


def test_the_package_face_still_gives_every_public_name():
    import fastsave

    for name in fastsave.__all__:
        assert getattr(fastsave, name) is not None, name


def test_command_line_save_methods_are_the_registered_ones():
    import fastsave.formats  # noqa: F401 - registers the output formats
    from fastsave.options import save_methods
    from fastsave.save_methods import COMMAND_LINE_SAVE_METHODS

    assert sorted(COMMAND_LINE_SAVE_METHODS) == sorted(save_methods())


def test_quiet_imports_silences_the_chatter_and_gives_the_levels_back(caplog):
    from fastsave.cli.quiet import IMPORT_CHATTER, quiet_imports

    before = [logging.getLogger(name).level for name in IMPORT_CHATTER]
    with caplog.at_level(logging.WARNING), quiet_imports():
        for name in IMPORT_CHATTER:
            logging.getLogger(name).warning("Failed to load an optional extension")
    assert [r for r in caplog.records if r.name in IMPORT_CHATTER] == []
    assert [logging.getLogger(name).level for name in IMPORT_CHATTER] == before
