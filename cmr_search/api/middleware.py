"""The app's two ASGI middlewares: the request-size guard (413) and the per-route metrics.

Both are plain ASGI classes: Starlette's request-wrapping ``BaseHTTPMiddleware`` costs
about a millisecond a request.
"""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from cmr_search.api.errors import error_response
from cmr_search.api.metrics import ApiMetrics

__all__ = ["BodyLimit", "Observe"]


class BodyLimit:
    """Refuse a request body over the upload limit (413): at once when its Content-Length
    says so, else when the bytes read pass it (a chunked upload has no length)."""

    def __init__(self, app, limit: int, framing: int):
        self.app, self.limit, self.framing = app, limit, framing

    def message(self, what: str) -> str:
        """Why the request was refused, and what to do."""
        return (f"{what}; uploads are limited to {self.limit:,} bytes (CMR_MAX_UPLOAD_BYTES, plus "
                f"{self.framing:,} of multipart framing): upload fewer files or ask the operator to raise it")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        allowed = self.limit + self.framing
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            response = error_response(413, "upload_too_large", self.message(f"the request has {int(length):,} bytes"))
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > allowed:
                # an HTTPException: FastAPI passes it on from body parsing (anything else
                # becomes its generic 400), and the app's handler gives it its code
                raise StarletteHTTPException(413, self.message(f"the request body passed {allowed:,} bytes"))
            return message

        return await self.app(scope, limited, send)


class Observe:
    """Count and time every request by its route template."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope["method"], getattr(route, "path", "unmatched"), status, time.perf_counter() - t0)
