"""The fastsave version: kept here only (pyproject reads it; ``fastsave.__version__`` re-exports it)."""

__version__ = "0.1.0"
