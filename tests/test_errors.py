"""Every error fastsave raises on purpose is defined in fastsave.errors and derives from FastsaveError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import fastsave
from fastsave import errors

# Exceptions that never leave fastsave: signals between its own functions, caught where they are raised.
INTERNAL_SIGNALS = {"Agreed", "SwitchUnsupported", "CrossDeviceEntry"}


def _fastsave_modules():
    for info in pkgutil.walk_packages(fastsave.__path__, "fastsave."):
        if not info.name.startswith("fastsave.kernels"):  # Triton kernels: no errors of their own
            yield importlib.import_module(info.name)


def test_every_error_class_lives_in_fastsave_errors():
    found = {}
    for module in _fastsave_modules():
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = value
    elsewhere = sorted(
        n
        for n, cls in found.items()
        if cls.__module__ != "fastsave.errors" and cls.__name__ not in INTERNAL_SIGNALS
    )
    assert elsewhere == []
    public = [cls for cls in vars(errors).values() if inspect.isclass(cls) and issubclass(cls, BaseException)]
    assert len(public) >= 2 and all(issubclass(cls, errors.FastsaveError) for cls in public)
    assert {n.rsplit(".", 1)[1] for n in found if not n.startswith("fastsave.errors")} == INTERNAL_SIGNALS


def test_errors_keep_the_builtin_bases_callers_catch():
    assert issubclass(errors.PlanError, ValueError) and issubclass(errors.DiskSpaceError, OSError)
    assert issubclass(errors.LlamaCppNotFoundError, FileNotFoundError)
    assert issubclass(errors.RankFailedError, RuntimeError)
    assert fastsave.FastsaveError is errors.FastsaveError
