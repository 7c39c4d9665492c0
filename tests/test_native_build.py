"""fastsave.native: the C kernels compiled once into a cache, and every way of not having them.

Each test builds into its own cache directory (FASTSAVE_CACHE_DIR) and loads the real library
with ctypes; the round trip's results are checked against bitsandbytes in test_nf4_fused.py.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import shutil
import tempfile

import pytest

from fastsave import native

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine to build with")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has loaded nothing yet, with its cache in tmp_path/cache."""
    monkeypatch.setenv("FASTSAVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTSAVE_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    native.load_library.cache_clear()
    yield tmp_path / "cache" / "native"
    native.load_library.cache_clear()


@needs_compiler
def test_compiled_once_then_loaded_from_the_cache(fresh, monkeypatch):
    library = native.load_library("codes_4bit")
    assert isinstance(library, ctypes.CDLL)
    assert hasattr(library, "fastsave_round_trip_4bit")
    built = list(fresh.glob("codes_4bit-*.so"))
    assert len(built) == 1
    assert not list(fresh.glob(".*"))  # no temporary file left beside it

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds it")

    monkeypatch.setattr(native, "_compile", no_compiling)
    native.load_library.cache_clear()
    assert native.load_library("codes_4bit") is not None


@needs_compiler
def test_an_edited_source_is_compiled_anew(fresh, monkeypatch, tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    source = sources / "codes_4bit.c"
    shutil.copy(native.SOURCE_DIRECTORY / "codes_4bit.c", source)
    monkeypatch.setattr(native, "SOURCE_DIRECTORY", sources)
    assert native.load_library("codes_4bit") is not None
    source.write_text(source.read_text() + "\nint fastsave_edited(void) { return 7; }\n")
    native.load_library.cache_clear()
    library = native.load_library("codes_4bit")
    assert library.fastsave_edited() == 7
    assert len(list(fresh.glob("codes_4bit-*.so"))) == 2


@needs_compiler
def test_a_cached_library_loads_without_running_anything_and_another_compiler_builds_anew(
    fresh, monkeypatch, tmp_path
):
    """Once cached, loading runs no program (the compiler is named by its file, not by asking it
    for its version); a compiler whose program changed builds anew."""
    real = next(shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name))
    wrapper = tmp_path / "wrapped-cc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.load_library("codes_4bit") is not None

    def no_program(*args, **kwargs):
        raise AssertionError(f"ran {args[0]!r} although the cache holds the library")

    with monkeypatch.context() as patched:
        patched.setattr(native.subprocess, "run", no_program)
        native.load_library.cache_clear()
        assert native.load_library("codes_4bit") is not None
    wrapper.write_text(f'#!/bin/sh\n# upgraded\nexec {real} "$@"\n')
    native.load_library.cache_clear()
    assert native.load_library("codes_4bit") is not None
    assert len(list(fresh.glob("codes_4bit-*.so"))) == 2


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("FASTSAVE_NATIVE", "0")
    assert native.load_library("codes_4bit") is None
    assert not fresh.exists()


def test_a_compiler_that_fails_gives_none_and_says_why(fresh, monkeypatch, tmp_path, caplog):
    failing = tmp_path / "failing-cc"
    failing.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo failing-cc 1.0; exit 0; }\necho 'no: broken' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.INFO, logger="fastsave.native"):
        assert native.load_library("codes_4bit") is None
    assert "compiling codes_4bit.c failed" in caplog.text
    assert "no: broken" in caplog.text
    assert not fresh.exists() or not any(fresh.iterdir())  # nothing half-written kept


def test_a_missing_compiler_gives_none(fresh, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="fastsave.native"):
        assert native.load_library("codes_4bit") is None
    assert "not available" in caplog.text

    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang to be found
    native.load_library.cache_clear()
    with caplog.at_level(logging.INFO, logger="fastsave.native"):
        assert native.load_library("codes_4bit") is None
    assert "no C compiler found" in caplog.text


@needs_compiler
def test_an_unwritable_cache_compiles_into_a_temporary_directory_that_goes(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    library = native.load_library("codes_4bit")
    assert library is not None and hasattr(library, "fastsave_block_absmax")
    assert blocker.read_text() == "a file where the cache directory would be"
    assert glob.glob(os.path.join(tmp_path / "tmp", "*")) == []  # loaded, then removed
