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


def test_quiet_libraries_silences_the_chatter_and_gives_the_levels_and_filters_back(caplog):
    import warnings

    import pytest

    from fastsave.cli.quiet import LIBRARY_CHATTER, quiet_libraries

    deprecation = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    before = [logging.getLogger(name).level for name in LIBRARY_CHATTER]
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # what the block does not ignore is recorded
        with quiet_libraries():
            for name in LIBRARY_CHATTER:
                logging.getLogger(name).warning("Failed to load an optional extension")
                logging.getLogger(f"{name}.inner").warning("a child logger of the package")
            logging.getLogger(LIBRARY_CHATTER[0]).setLevel(logging.WARNING)  # as a package may on import
            logging.getLogger(LIBRARY_CHATTER[0]).warning("after its own level was set")
            logging.getLogger("fastsave").warning("fastsave's own message")
            warnings.warn(deprecation, FutureWarning, stacklevel=1)
            warnings.warn("a deprecation of the user's own", FutureWarning, stacklevel=1)
    assert [r.name for r in caplog.records] == ["fastsave"]
    assert [str(w.message) for w in seen] == ["a deprecation of the user's own"]
    assert logging.getLogger(LIBRARY_CHATTER[0]).level == logging.WARNING  # the package's own, kept
    logging.getLogger(LIBRARY_CHATTER[0]).setLevel(before[0])
    assert [logging.getLogger(name).level for name in LIBRARY_CHATTER] == before
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):  # the filter is gone
        warnings.warn(deprecation, FutureWarning, stacklevel=1)


# what other libraries printed in `fastsave demo` and `fastsave merge` with today's releases
CHATTER = (
    "Failed to load",  # torchao's optional extensions; bitsandbytes' kernel from the hub
    "Skipping publisher trust check",  # kernels
    "is an Enum subclass",  # torch on torchao's enums
    "Setting accelerator to CPU",  # DeepSpeed
    "is_gradient_checkpointing",  # transformers, as peft reads it
    "`torch_dtype` is deprecated",  # transformers, as fastsave read a config
    "Loading weights",  # transformers' progress bars for the tiny model the demo builds
)


def test_the_demo_prints_only_fastsave_s_messages(tmp_path):
    """In a fresh process, where every library speaks on its first import."""
    out = str(tmp_path / "out")
    run = f"import sys\nfrom fastsave.cli import main\nsys.exit(main(['demo', {out!r}, '--steps', '1']))"
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=600)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    assert "[bit-exact]" in printed
    assert [line for line in printed.splitlines() if any(c in line for c in CHATTER)] == []
