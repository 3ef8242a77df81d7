"""Shared helpers for choosing a kernel backend at call time, so optional packages stay optional."""
from __future__ import annotations

import importlib

from .errors import StreamT1Error


class BackendUnavailableError(StreamT1Error, RuntimeError):
    """A requested attention/kernel backend needs a package that is not installed."""


def require_module(module: str, pip_name: str | None = None, what: str | None = None):
    """Import ``module`` or raise a one-line error telling the user what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = what or module
        raise BackendUnavailableError(f"{name} is not installed; pip install {pip_name or module}") from exc


def check_backend(backend: str, allowed: tuple[str, ...], op: str) -> None:
    if backend not in allowed:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(allowed)}")
