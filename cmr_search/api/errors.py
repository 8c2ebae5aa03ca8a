"""Errors of the API. The service raises domain errors (``ServiceError`` and its kinds, all
``CmrError``s, so callers outside HTTP catch them like any other); the routes and their
dependencies raise ``ApiError``, an HTTP error with a code. The app maps both to one JSON
shape, ``{"error": {status, code, message}}`` (``error_response``), the domain errors
through one table of statuses (``cmr_search.api.app.DOMAIN_ERRORS``)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cmr_search.core.exceptions import CmrError, InputError

__all__ = ["ApiError", "Cancelled", "Conflict", "InvalidUpload", "NotFound", "ServiceError", "TooLarge", "Unusable",
           "error_response"]


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The one shape every error of the API leaves in."""
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


class ApiError(HTTPException):
    """An HTTP error of a route or dependency, with a stable machine code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, message)
        self.code = code


class ServiceError(CmrError):
    """A request the service refuses; ``code`` names the reason for machines (the API's error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class NotFound(ServiceError, LookupError):
    """No such study, or no such view of it."""


class Conflict(ServiceError):
    """The store cannot do this as it stands (e.g. no vision encoder to embed an upload with)."""


class TooLarge(ServiceError, InputError):
    """An upload over one of its limits (bytes, files, unpacked bytes)."""


class InvalidUpload(ServiceError, InputError):
    """An upload that is unsafe or unreadable (zip paths, links, encryption, bombs), empty, or of several studies."""


class Unusable(ServiceError, InputError):
    """An upload that reads but holds nothing usable (no cine study)."""


class Cancelled(ServiceError):
    """The client went away before the work was done; it stopped at the next stage boundary
    (nothing stored)."""
