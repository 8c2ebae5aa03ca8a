"""The FastAPI application: routes, API-key auth, errors as one JSON shape, metrics, and
the web page. ``create_app(settings)`` builds it; ``cmr serve`` runs it under uvicorn.

Every endpoint that touches the store hands its work to a thread in one hop, so searches,
uploads and cines never block the event loop: searches to their own few threads
(``search_threads``), the rest to the pool (``serve_threads``). A text query's encoding
is awaited on the encoder's batching thread, holding no thread of either.
The endpoints and dependencies themselves are ``async``: FastAPI would run a plain ``def``
dependency, endpoint and response validation each on the pool, and those hops cost more
CPU than the search (measured: 3.2 ms a request against a 1 ms FAISS query).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmr_search.api import schemas
from cmr_search.api.auth import ApiKey
from cmr_search.api.errors import ApiError
from cmr_search.api.metrics import ApiMetrics
from cmr_search.api.service import SearchService
from cmr_search.api.settings import ServeSettings
from cmr_search.api.workers import current_share
from cmr_search.core.exceptions import InputError, StoreError

__all__ = ["app_from_env", "create_app"]

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_bearer = HTTPBearer(auto_error=False, description="An API key from `cmr keys create`")
_ERRORS = {400: {"model": schemas.ErrorBody}, 401: {"model": schemas.ErrorBody}, 403: {"model": schemas.ErrorBody},
           404: {"model": schemas.ErrorBody}, 422: {"model": schemas.ErrorBody}}


async def _off_loop(fn, *args, limiter: anyio.CapacityLimiter | None = None):
    """Run ``fn(*args)`` on a thread (at most ``limiter``'s many at once, else the pool's) and await it."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


async def _service(request: Request) -> SearchService:
    # async: FastAPI runs a plain `def` dependency on the thread pool, a hop that cost more
    # than the search itself (measured: 3.2 ms of CPU a request with two such dependencies)
    service = request.app.state.service
    if not service.ready.is_set():
        raise ApiError(503, "starting", "the service is still loading its index and encoders; retry in a few seconds")
    return service


def require(role: str):
    """A dependency that admits a request whose bearer key has ``role`` (or auth is off)."""

    async def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]):
        # async, like _service: a stat and a hash, no reason for a thread hop
        settings: ServeSettings = request.app.state.settings
        if not settings.auth:
            return None
        if credentials is None:
            raise ApiError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>' "
                           "(an operator creates one with `cmr keys create --store DIR --role read`)")
        key: ApiKey | None = request.app.state.service.keys.verify(credentials.credentials)
        if key is None:
            raise ApiError(401, "invalid_api_key", "the API key is not known to this store (revoked, or from another store)")
        if not key.allows(role):
            raise ApiError(403, "forbidden", f"this key has the {key.role} role; this request needs {role}")
        return key

    return Depends(check)


def _filters(filters: str | None) -> schemas.Filters:
    if not filters:
        return schemas.Filters()
    try:
        return schemas.Filters.model_validate(json.loads(filters))
    except (json.JSONDecodeError, ValidationError) as error:
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise ApiError(422, "invalid_filters", f"filters must be a JSON object such as "
                       f'{{"sex": "F", "age_min": 60, "label_max": {{"lvef": 35}}}}: {detail}') from error


class _BodyLimit:
    """Refuse a request body over the upload limit (413): at once when its Content-Length
    says so, else when the bytes read pass it (a chunked upload has no length)."""

    def __init__(self, app, limit: int, framing: int):
        self.app, self.limit, self.framing = app, limit, framing

    def message(self, what: str) -> str:
        return (f"{what}; uploads are limited to {self.limit:,} bytes (CMR_MAX_UPLOAD_BYTES, plus "
                f"{self.framing:,} of multipart framing): upload fewer files or ask the operator to raise it")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        allowed = self.limit + self.framing
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            response = _error(413, "upload_too_large", self.message(f"the request has {int(length):,} bytes"))
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > allowed:
                # an HTTPException: FastAPI passes it on from body parsing (anything else
                # becomes its generic 400), and the handler below gives it its code
                raise StarletteHTTPException(413, self.message(f"the request body passed {allowed:,} bytes"))
            return message

        return await self.app(scope, limited, send)


class _Observe:
    """Count and time every request by its route template (a plain ASGI middleware: the
    request-wrapping kind costs about a millisecond a request)."""

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


def create_app(settings: ServeSettings, service: SearchService | None = None, warm_in_background: bool = True) -> FastAPI:
    """The API over one store (the service is built here unless given)."""
    service = service or SearchService(settings)
    metrics = ApiMetrics()
    # Searches take their own thread(s): a short CPU-bound job finishes sooner alone than
    # time-sliced with seven others under the GIL (neighbour p99 at 32 clients, 2 workers:
    # 57 ms on 8 threads, 40 ms on 1; docs/BENCHMARKS.md), and a slow upload or cine on the
    # general pool cannot hold every search back.
    searches = anyio.CapacityLimiter(settings.search_threads)

    def warm() -> None:
        service.warm()
        if (share := current_share()) is not None:
            share.mark_warm()  # the other workers' /readyz counts this one

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.serve_threads
        if warm_in_background:
            threading.Thread(target=warm, name="cmr-warm", daemon=True).start()
        else:
            warm()
        yield
        metrics.close()

    app = FastAPI(title="cmr-search", version="0.1.0", lifespan=lifespan,
                  description="Text-to-scan and scan-to-scan search over cine cardiac MRI embeddings, new-study "
                              "upload, and predictions of the registered heads. Every endpoint but the health "
                              "checks, the page and these docs needs `Authorization: Bearer <API key>`.")
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return _error(error.status, error.code, error.message)

    @app.exception_handler(InputError)
    async def input_error(_request, error: InputError):
        return _error(400, "bad_request", str(error))

    @app.exception_handler(StoreError)
    async def store_error(_request, error: StoreError):
        return _error(503, "store_unavailable", str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        detail = str(error.detail)
        if error.status_code == 400 and detail.startswith("Too many files"):  # Starlette's form limit
            return _error(413, "too_many_files", f"the upload has more than {settings.max_upload_files:,} files "
                          "(CMR_MAX_UPLOAD_FILES); zip the study, or upload it in fewer files")
        code = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, detail)

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        log.error("internal error: %s", type(error).__name__, exc_info=error)  # no request content in logs
        return _error(500, "internal", "an internal error occurred; the operator's log has the details")

    app.add_middleware(_Observe, metrics=metrics)
    app.add_middleware(_BodyLimit, limit=settings.max_upload_bytes, framing=1 << 20)

    read, write = require("read"), require("write")

    # -- health -----------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> schemas.Health:
        """The process is up."""
        return schemas.Health()

    @app.get("/readyz", tags=["health"], responses={503: {"model": schemas.ErrorBody}})
    def readyz() -> schemas.Ready:
        """Index and encoders loaded, in every worker process; searches answer at full speed."""
        if not service.ready.is_set():
            raise ApiError(503, "starting", "loading the index and encoders")
        share = current_share()
        if share is not None and (warm := share.warm_workers()) < share.workers:
            raise ApiError(503, "starting", f"{warm} of {share.workers} workers have loaded the index and encoders")
        return schemas.Ready(model_id=service.model_id)

    @app.get("/metrics", tags=["health"], dependencies=[read], response_class=Response)
    def prometheus() -> Response:
        """Prometheus text format: requests and latency by route, index rows, uploads."""
        rows = service.stats() if service.ready.is_set() else {}
        return Response(metrics.render(rows), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- search -----------------------------------------------------------------------------
    @app.post("/search/text", tags=["search"], dependencies=[read], responses=_ERRORS)
    async def search_text(query: schemas.TextQuery, svc: Annotated[SearchService, Depends(_service)]) -> schemas.SearchResult:
        """Text-to-scan: studies ranked by the similarity of their embedding to the encoded query."""
        svc.check_text_query(query)
        # the encoder's batcher thread encodes it together with whatever else is waiting; no
        # pool thread waits for it, so a burst of text queries fills whole batches
        vector = await asyncio.wrap_future(svc.encode_text.submit(query.query))
        return await _off_loop(svc.search_text, query, vector, limiter=searches)

    @app.get("/studies/{study_uid}/neighbors", tags=["search"], dependencies=[read], responses=_ERRORS)
    async def neighbors(study_uid: str, svc: Annotated[SearchService, Depends(_service)],
                  k: Annotated[int, Query(ge=1, le=10_000)] = 10,
                  filters: Annotated[str | None, Query(description='JSON, e.g. {"sex": "F", "view": "SAX"}')] = None,
                  exclude_same_patient: bool = False) -> schemas.NeighborList:
        """Scan-to-scan: the k nearest other studies (optionally not the same patient's)."""
        return await _off_loop(svc.neighbors, study_uid, k, _filters(filters), exclude_same_patient, limiter=searches)

    # -- studies ----------------------------------------------------------------------------
    @app.post("/studies", tags=["studies"], dependencies=[write],
              form_limits={"max_files": settings.max_upload_files, "max_fields": 16},
              responses={**_ERRORS, 409: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody}})
    async def upload(files: Annotated[list[UploadFile], File(description="DICOM files of one study, or zips of them")],
               svc: Annotated[SearchService, Depends(_service)], persist: bool = True) -> schemas.UploadResult:
        """A new study (DICOM files or a zip): ingest, embed, and answer its neighbours and
        the heads' predictions; ``persist=false`` answers without storing anything."""
        try:
            result = await _off_loop(svc.upload, [(f.filename or "", f.file) for f in files], persist)
        except ApiError:
            metrics.uploads.labels("refused").inc()
            raise
        metrics.uploads.labels("stored" if persist else "answered").inc()
        return result

    @app.get("/studies/{study_uid}", tags=["studies"], dependencies=[read], responses=_ERRORS)
    async def study(study_uid: str, svc: Annotated[SearchService, Depends(_service)]) -> schemas.StudyDetail:
        """A study's metadata and views, each with the URL of its cine loop."""
        return await _off_loop(svc.study, study_uid)

    @app.get("/studies/{study_uid}/views/{clip_id}/cine", tags=["studies"], dependencies=[read], responses=_ERRORS,
             response_class=FileResponse)
    async def cine(study_uid: str, clip_id: str, svc: Annotated[SearchService, Depends(_service)]) -> FileResponse:
        """One view's cine as an animated image (WebP or GIF), looping at the acquired heart rate."""
        path = await _off_loop(svc.cine, study_uid, clip_id)
        return FileResponse(path, media_type=f"image/{svc.cines.fmt}",
                            headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/studies/{study_uid}/predictions", tags=["studies"], dependencies=[read], responses=_ERRORS)
    async def predictions(study_uid: str, svc: Annotated[SearchService, Depends(_service)]) -> schemas.PredictionList:
        """Every registered head of this encoder on the study, with its attention per view."""
        return await _off_loop(svc.predictions, study_uid)

    @app.delete("/studies/{study_uid}", tags=["studies"], dependencies=[write], responses=_ERRORS)
    async def delete(study_uid: str, svc: Annotated[SearchService, Depends(_service)]) -> schemas.Withdrawal:
        """Withdraw a study everywhere: clips, reports, labels, embeddings, indexes, caches."""
        return await _off_loop(svc.delete, study_uid)

    @app.get("/heads", tags=["heads"], dependencies=[read])
    async def heads(svc: Annotated[SearchService, Depends(_service)]) -> list[schemas.HeadInfo]:
        """The registered heads with their cards' metrics."""
        return await _off_loop(svc.heads)

    @app.get("/clusters", tags=["search"], dependencies=[read])
    async def clusters(svc: Annotated[SearchService, Depends(_service)]) -> schemas.ClusterList:
        """HDBSCAN clusters of the study embeddings (cached per model and table version)."""
        return await _off_loop(svc.clusters)

    # -- the page ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_env() -> FastAPI:
    """The app from ``CMR_*`` settings (what ``cmr serve`` runs in each uvicorn worker)."""
    return create_app(ServeSettings())
