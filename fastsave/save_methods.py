"""The save methods accepted now: the two every input supports, and those output formats register.

Kept apart from fastsave.options (which needs torch for dtypes) so that the command line can check
its arguments without importing anything heavy.
"""

from __future__ import annotations

from fastsave.compressed_schemes import SCHEMES

# The save methods every input supports; output formats add theirs (fastsave.formats.register).
_SAVE_METHODS = ["lora", "merged_16bit"]
# What ``fastsave merge --save-method`` offers, known before any heavy import: the two above and the
# built-in output formats of fastsave.formats (tests/test_cli_merge.py holds the two lists together).
COMMAND_LINE_SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit_forced", *SCHEMES)


def add_save_method(name: str) -> None:
    """Accept ``name`` as a save_method (an output format registers its own)."""
    if name not in _SAVE_METHODS:
        _SAVE_METHODS.append(name)


def remove_save_method(name: str) -> None:
    """Undo :func:`add_save_method` (tests register toy formats)."""
    if name in ("lora", "merged_16bit"):
        raise ValueError(f"{name!r} is not an output format's save method")
    _SAVE_METHODS.remove(name)


def save_methods() -> tuple[str, ...]:
    """Every save_method accepted now."""
    return tuple(_SAVE_METHODS)
