"""Lazy package exports: a name is imported from its module on first use."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports each exported name from its home module when
    first asked for (so importing the package costs nothing: ingest workers must not load
    lancedb, ``cmr --help`` must not load torch)."""

    def __getattr__(name: str):
        if name in homes:
            return getattr(import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
