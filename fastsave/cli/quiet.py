"""The command line's runs, without other libraries' chatter.

torch, torchao, bitsandbytes and others log warnings that say nothing the user of the command can
act on: torchao's optional CUDA extensions missing on a CPU machine, torch's note on how torchao
registers an Enum, bitsandbytes failing to fetch an optional CPU kernel from the hub and the
``kernels`` package saying it skipped that kernel's publisher check offline, DeepSpeed choosing
the CPU as its accelerator, and transformers' deprecation of ``is_gradient_checkpointing``, which
peft reads when it wraps a model. Many of them speak when their package is first imported, and
the imports happen lazily, deep in the work (transformers imports torchao when it loads a model).
So the command raises those loggers to ERROR and ignores that deprecation for its whole run, then
puts them back: what the user sees is fastsave's own messages and real errors. A library user's
own logging and warnings are never touched: this is the command's choice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# loggers that speak about their own package, not about the user's command
LIBRARY_CHATTER = (
    "torchao",
    "torch.utils._pytree",
    "bitsandbytes.backends.cpu.ops",
    "kernels",
    "DeepSpeed",
)
# (category, message regex) of warnings from other libraries' use of each other
IGNORED_WARNINGS = ((FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Raise :data:`LIBRARY_CHATTER` to ERROR and ignore :data:`IGNORED_WARNINGS` for the block;
    put the levels and the warning filters back after.

    The level covers each package's child loggers; a filter on the logger itself covers a package
    that sets its own logger's level when it is imported (DeepSpeed does), and that level is kept.
    """
    loggers = [logging.getLogger(name) for name in LIBRARY_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
        logger.addFilter(_errors_only)
    try:
        with warnings.catch_warnings():
            for category, message in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeFilter(_errors_only)
            if logger.level == logging.ERROR:  # still ours, not set by its package meanwhile
                logger.setLevel(level)
