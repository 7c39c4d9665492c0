"""fastsave's log lines: the library convention, and visible in a notebook that configured nothing.

Every module logs to ``logging.getLogger(__name__)`` under the ``fastsave`` logger, which has only
a NullHandler: where the application configured logging (a handler on the root logger or on
``fastsave``), its configuration decides what is shown. Where it configured nothing (a notebook, a
script), a save would otherwise say nothing about where its checkpoint went: :func:`visible` shows
fastsave's INFO lines on stderr for the duration of one public call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

logger = logging.getLogger("fastsave")
logger.addHandler(logging.NullHandler())

F = TypeVar("F", bound=Callable[..., Any])


def _configured() -> bool:
    """Whether the application (or an outer fastsave call) put a handler where fastsave's lines go."""
    own = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    return bool(own) or bool(logging.getLogger().handlers) or not logger.propagate


@contextmanager
def visible() -> Iterator[None]:
    """Show fastsave's INFO lines on stderr while the block runs, unless logging is configured."""
    if _configured():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def shows_its_lines(function: F) -> F:
    """Decorate a public entry point: its log lines are :func:`visible`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with visible():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
