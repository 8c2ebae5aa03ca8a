"""What the routes depend on: the service and the app's parts as ``Annotated`` aliases, the
API-key guards, the checks of a query that need this service's settings, and the one hop
to a thread.

The dependencies are ``async``: FastAPI runs a plain ``def`` dependency on the thread pool,
a hop that cost more than the search itself (measured: 3.2 ms of CPU a request with two
such dependencies against a 1 ms FAISS query); an ``async`` one costs about 8 µs (measured).
"""

from __future__ import annotations

import functools
import json
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from cmr_search.api import schemas
from cmr_search.api.auth import ApiKey
from cmr_search.api.errors import ApiError
from cmr_search.api.metrics import ApiMetrics
from cmr_search.api.service import SearchService

__all__ = ["AnyServiceDep", "MetricsDep", "ReadKey", "SearchLimiterDep", "ServiceDep", "WriteKey", "check_k",
           "off_loop", "parse_filters", "require"]

_bearer = HTTPBearer(auto_error=False, description="An API key from `cmr keys create`")


async def off_loop(fn, *args, limiter: anyio.CapacityLimiter | None = None):
    """Run ``fn(*args)`` on a thread (at most ``limiter``'s many at once, else the pool's) and await it."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


async def _ready_service(request: Request) -> SearchService:
    service = request.app.state.service
    if not service.ready.is_set():
        raise ApiError(503, "starting", "the service is still loading its index and encoders; retry in a few seconds")
    return service


async def _any_service(request: Request) -> SearchService:
    return request.app.state.service


async def _metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


async def _search_limiter(request: Request) -> anyio.CapacityLimiter:
    return request.app.state.searches


#: the service once it has warmed (503 ``starting`` before)
ServiceDep = Annotated[SearchService, Depends(_ready_service)]
#: the service, warmed or still loading: for the health checks, which report which
AnyServiceDep = Annotated[SearchService, Depends(_any_service)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
#: the searches' own threads (``search_threads``), apart from the pool (see ``create_app``)
SearchLimiterDep = Annotated[anyio.CapacityLimiter, Depends(_search_limiter)]


def require(role: str):
    """A dependency that admits a request whose bearer key has ``role`` (or auth is off)."""

    async def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]):
        # async: a stat and a hash, no reason for a thread hop
        if not request.app.state.settings.auth:
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


ReadKey, WriteKey = require("read"), require("write")


def check_k(k: int, service: SearchService) -> int:
    """``k`` when this service gives that many results (``max_k``; the schemas hold the fixed bounds)."""
    if k > service.settings.max_k:
        raise ApiError(422, "k_out_of_range", f"k must be between 1 and {service.settings.max_k} (got {k})")
    return k


def parse_filters(filters: str | None) -> schemas.Filters:
    """The ``filters`` query parameter (JSON) as ``Filters``, or a 422 that shows the form."""
    if not filters:
        return schemas.Filters()
    try:
        return schemas.Filters.model_validate(json.loads(filters))
    except (json.JSONDecodeError, ValidationError) as error:
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise ApiError(422, "invalid_filters", f"filters must be a JSON object such as "
                       f'{{"sex": "F", "age_min": 60, "label_max": {{"lvef": 35}}}}: {detail}') from error
