"""The FastAPI application, assembled: lifespan (warm-up), middleware, the error handlers,
the routers (``routes/``) and the page. ``create_app(settings)`` builds it; ``cmr serve``
runs ``app_from_env`` under uvicorn in each worker.

Every endpoint that touches the store hands its work to a thread in one hop
(``deps.off_loop``), so searches, uploads and cines never block the event loop: searches
to their own few threads (``search_threads``), the rest to the pool (``serve_threads``).
A text query's encoding is awaited on the encoder's batching thread, holding no thread of
either. The endpoints and dependencies themselves are ``async``: FastAPI would run a plain
``def`` dependency, endpoint and response validation each on the pool, and those hops cost
more CPU than the search (measured: 3.2 ms a request against a 1 ms FAISS query).

Errors leave in one shape (``errors.error_response``): the service's domain errors by the
table ``DOMAIN_ERRORS``, the routes' ``ApiError`` and Starlette's HTTP errors by their
status, a request that fails validation as 422 ``invalid_request``, anything else as 500.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmr_search.api.errors import (
    Cancelled,
    Conflict,
    InvalidUpload,
    NotFound,
    TooLarge,
    Unusable,
    error_response,
)
from cmr_search.api.logs import install_access_log_filter
from cmr_search.api.metrics import ApiMetrics
from cmr_search.api.middleware import BodyLimit, Observe
from cmr_search.api.routes import clusters, heads, health, page, search, studies
from cmr_search.api.service import SearchService
from cmr_search.api.settings import ServeSettings
from cmr_search.api.workers import current_share
from cmr_search.core.exceptions import CmrError, InputError, StoreError, WithdrawnError

__all__ = ["DOMAIN_ERRORS", "app_from_env", "create_app"]

log = logging.getLogger(__name__)

#: every domain error the API answers: its HTTP status and error code (None: the error's
#: own ``code``, which names the case, e.g. ``study_not_found``); the most specific class wins
DOMAIN_ERRORS: dict[type[CmrError], tuple[int, str | None]] = {
    NotFound: (404, None),
    Conflict: (409, None),
    TooLarge: (413, None),
    InvalidUpload: (400, None),
    Unusable: (422, None),
    Cancelled: (499, None),  # nginx's "client closed request": nobody reads it, the log does
    WithdrawnError: (409, "study_withdrawn"),
    InputError: (400, "bad_request"),
    StoreError: (503, "store_unavailable"),
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}


async def _domain_error(_request, error: CmrError):
    status, code = next(DOMAIN_ERRORS[cls] for cls in type(error).__mro__ if cls in DOMAIN_ERRORS)
    return error_response(status, code or error.code, str(error))


async def _validation_error(_request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(422, "invalid_request", f"{where}: {first['msg']}" if where else first["msg"])


async def _internal_error(_request, error: Exception):
    log.error("internal error: %s", type(error).__name__, exc_info=error)  # no request content in logs
    return error_response(500, "internal", "an internal error occurred; the operator's log has the details")


def create_app(settings: ServeSettings, service: SearchService | None = None, warm_in_background: bool = True) -> FastAPI:
    """The API over one store (the service is built here unless given)."""
    service = service or SearchService(settings)
    metrics = ApiMetrics()
    sync = None
    if settings.sync_url:  # built here: a bad URL or a missing secret stops the start, saying why
        from cmr_search.api.sync import BackgroundSync

        sync = BackgroundSync(settings)

    def warm() -> None:
        service.warm()  # ends with gc.freeze() of the warmed heap (service.py says why)
        if (share := current_share()) is not None:
            share.mark_warm()  # the other workers' /readyz counts this one

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        install_access_log_filter()  # a key sent as ?api_key=... never reaches the access log
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.serve_threads
        if warm_in_background:
            threading.Thread(target=warm, name="cmr-warm", daemon=True).start()
        else:
            warm()
        if sync is not None:
            sync.start()
        yield
        if sync is not None:
            sync.stop()
        metrics.close()

    app = FastAPI(title="cmr-search", version="0.1.0", lifespan=lifespan,
                  description="Text-to-scan and scan-to-scan search over cine cardiac MRI embeddings, new-study "
                              "upload, and predictions of the registered heads. Every endpoint but the health "
                              "checks, the page and these docs needs `Authorization: Bearer <API key>`.")
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics
    app.state.sync = sync
    # Searches take their own thread(s): a short CPU-bound job finishes sooner alone than
    # time-sliced with seven others under the GIL (neighbour p99 at 32 clients, 2 workers:
    # 57 ms on 8 threads, 40 ms on 1; docs/BENCHMARKS.md), and a slow upload or cine on the
    # general pool cannot hold every search back.
    app.state.searches = anyio.CapacityLimiter(settings.search_threads)

    async def http_error(_request, error: StarletteHTTPException):
        detail = str(error.detail)
        if error.status_code == 400 and detail.startswith("Too many files"):  # Starlette's form limit
            return error_response(413, "too_many_files", f"the upload has more than {settings.max_upload_files:,} "
                                  "files (CMR_MAX_UPLOAD_FILES); zip the study, or upload it in fewer files")
        code = getattr(error, "code", None) or _HTTP_CODES.get(error.status_code, "http_error")  # ApiError has one
        return error_response(error.status_code, code, detail)

    for error_type in DOMAIN_ERRORS:
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, _internal_error)

    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes, framing=1 << 20)

    app.include_router(health.router)
    app.include_router(search.router)
    # the file count of an upload, counted by the form parser (studies.py)
    app.include_router(studies.router, form_limits={"max_files": settings.max_upload_files, "max_fields": 16})
    app.include_router(heads.router)
    app.include_router(clusters.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")

    def openapi() -> dict:
        # k's real limit is a setting (CMR_MAX_K), checked at the edge; the schemas carry
        # a fixed bound, so the document is given this server's own
        if app.openapi_schema is None:
            _cap_k(FastAPI.openapi(app), settings.max_k)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _cap_k(doc: dict, max_k: int) -> None:
    """Set the maximum of every ``k`` (query parameters and request bodies) to ``max_k``."""
    for operation in (op for item in doc.get("paths", {}).values() for op in item.values()):
        for parameter in operation.get("parameters", []):
            if parameter.get("name") == "k":
                parameter["schema"]["maximum"] = max_k
    for schema in doc.get("components", {}).get("schemas", {}).values():
        if "k" in schema.get("properties", {}):
            schema["properties"]["k"]["maximum"] = max_k


def app_from_env() -> FastAPI:
    """The app from ``CMR_*`` settings (what ``cmr serve`` runs in each uvicorn worker)."""
    return create_app(ServeSettings())
