"""Heavy imports for the command line, without other libraries' start-up chatter.

torch, torchao and bitsandbytes log warnings while they are imported that say nothing about the
user's command (torchao's optional CUDA extensions missing on a CPU machine, torch's note on how
torchao registers an Enum, bitsandbytes failing to fetch an optional CPU kernel from the hub). The
command raises those loggers to ERROR for the import alone, then puts them back: what the user
sees is fastsave's own messages. (A library user's own logging is never touched: this is the
command's choice.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# loggers that only speak while their package is imported, about the package itself
IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Raise :data:`IMPORT_CHATTER` to ERROR for the block; put their levels back after."""
    loggers = [logging.getLogger(name) for name in IMPORT_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
