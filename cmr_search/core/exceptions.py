"""Domain errors. Each message says what was wrong and what to do about it."""

from __future__ import annotations

__all__ = ["CmrError", "InputError", "StoreError", "WithdrawnError"]


class CmrError(Exception):
    """Base class of every error cmr-search raises on purpose."""


class StoreError(CmrError, RuntimeError):
    """The store directory is missing, unreadable or incompatible with the request."""


class InputError(CmrError, ValueError):
    """A user-supplied file or option cannot be used (bad CSV, missing path, ...)."""


class WithdrawnError(InputError):
    """The study was withdrawn from this store (``cmr delete``); it stays out until an operator
    readmits it (``cmr delete --readmit``)."""
