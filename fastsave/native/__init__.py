"""fastsave's C kernels: compiled once per machine with the system's C compiler, loaded with ctypes.

Some CPU work has no fast form in torch operations: the 4-bit round trip of ``fastsave merge``
runs about ten full passes over memory as torch operations, one as a C loop. Its source ships
in this package (``<name>.c``); the first process that needs it compiles it with ``$CC`` or the
first of ``cc``, ``gcc``, ``clang`` found, into a cache directory (``$FASTSAVE_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastsave``, else ``~/.cache/fastsave``; a temporary directory when that is not
writable), under a name that holds a hash of the source, the flags, the compiler's program (its
path, size and modification time) and the machine, so that an edited source or another compiler
builds anew. The file is compiled under a temporary name and renamed into place, so two processes
compiling at once each load a whole library.

Nothing depends on it: without a compiler, when compiling fails, or with ``FASTSAVE_NATIVE=0``,
:func:`load_library` returns None and callers use their torch path. Callers also check a
kernel's results against their reference before using it (fastsave.sources.nf4_fused).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIRECTORY = Path(__file__).parent
# -ffp-contract=off: no multiply and add fused into one rounding (the kernels must round where the
# torch operations they replace round); no -ffast-math, no -march=native (a cache directory in a
# shared home may serve machines with other CPUs: the sources pick vector units at load time);
# -fno-strict-aliasing: the kernels read float bits as integers
FLAGS = (
    "-O3",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-strict-aliasing",
    "-pthread",
)
COMPILE_SECONDS = 120


def cache_directory() -> Path:
    """Where compiled kernels are kept between processes."""
    explicit = os.environ.get("FASTSAVE_CACHE_DIR")
    if explicit:
        return Path(explicit) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastsave" / "native"


def _compiler() -> list[str] | None:
    chosen = os.environ.get("CC")
    if chosen:
        return shlex.split(chosen)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _compiler_identity(compiler: list[str]) -> str:
    """What names the compiler in the cache key: each word of the command, and for each that is a
    program or a file, its resolved path, size and modification time. A new or upgraded compiler
    (its program replaced) builds anew. No ``--version`` subprocess: that cost every process about
    6 ms of its first save on a 2-core machine, a fiftieth of a 250M save.

    Raises:
        FileNotFoundError: the compiler's program does not exist.
    """
    parts = []
    for position, word in enumerate(compiler):
        found = shutil.which(word) or (word if os.path.exists(word) else None)
        if found is None:
            if position == 0:
                raise FileNotFoundError(f"no compiler program {word!r}")
            parts.append(word)  # a flag of $CC
            continue
        real = os.path.realpath(found)
        status = os.stat(real)
        parts.append(f"{word}={real}:{status.st_size}:{status.st_mtime_ns}")
    return "\n".join(parts)


def _compile(compiler: list[str], source: Path, target: Path) -> None:
    """Compile ``source`` into ``target`` through a temporary file beside it (atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run(
            [*compiler, *FLAGS, str(source), "-o", temporary],
            capture_output=True,
            text=True,
            timeout=COMPILE_SECONDS,
            check=True,
        )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _build(name: str) -> tuple[Path, Path | None] | None:
    """The compiled library of ``name``.c (compiled now unless cached) and the temporary directory
    it was compiled into when the cache is not writable (None: it is in the cache); None without a
    compiler."""
    compiler = _compiler()
    if compiler is None:
        logger.info("fastsave: no C compiler found (cc, gcc, clang or $CC); using its torch path instead")
        return None
    source = SOURCE_DIRECTORY / f"{name}.c"
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(FLAGS).encode(), _compiler_identity(compiler).encode()):
        key.update(part)
    key.update(f"{platform.system()}-{platform.machine()}".encode())
    filename = f"{name}-{key.hexdigest()[:16]}.so"
    target = cache_directory() / filename
    if target.exists():
        return target, None
    try:
        _compile(compiler, source, target)
        return target, None
    except OSError:  # the cache directory is not writable: a temporary one, for this process
        scratch = Path(tempfile.mkdtemp(prefix="fastsave-native-"))
        try:
            _compile(compiler, source, scratch / filename)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return scratch / filename, scratch


@cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The C kernels of ``fastsave/native/<name>.c``, or None where they cannot be had here.

    Compiled on first use per machine (about a second), then loaded from the cache. Never raises:
    a missing compiler, a failed compile or load is logged (at INFO, with the compiler's message)
    and gives None. ``FASTSAVE_NATIVE=0`` turns every kernel off.
    """
    if os.environ.get("FASTSAVE_NATIVE", "1") == "0":
        return None
    try:
        built = _build(name)
        if built is None:
            return None
        path, scratch = built
        try:
            return ctypes.CDLL(str(path))
        finally:
            if scratch is not None:  # loaded: the mapping outlives the file
                shutil.rmtree(scratch, ignore_errors=True)
    except subprocess.CalledProcessError as error:
        logger.info("fastsave: compiling %s.c failed; using its torch path instead:\n%s", name, error.stderr)
    except (OSError, subprocess.SubprocessError) as error:
        logger.info(
            "fastsave: the C kernels of %s.c are not available (%s); using its torch path", name, error
        )
    return None
