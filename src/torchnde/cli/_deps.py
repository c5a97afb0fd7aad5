"""Lazy imports of the optional CLI dependencies (``pip install 'torchnde[cli]'``)."""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]

INSTALL_HINT = "pip install 'torchnde[cli]'"


class MissingDependencyError(RuntimeError):
    """An optional dependency of a ``torchnde`` command is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs {top}, which is not installed ({e}).\n"
            f"Install the command-line extras with:  {INSTALL_HINT}"
        ) from e


def positive_int(s: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v
