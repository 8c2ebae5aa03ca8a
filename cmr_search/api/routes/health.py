"""Health: liveness, readiness (in every worker process) and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cmr_search.api import schemas
from cmr_search.api.deps import AnyServiceDep, MetricsDep, ReadKey
from cmr_search.api.errors import ApiError
from cmr_search.api.workers import current_share

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> schemas.Health:
    """The process is up."""
    return schemas.Health()


@router.get("/readyz", responses={503: {"model": schemas.ErrorBody}})
def readyz(service: AnyServiceDep, request: Request) -> schemas.Ready:
    """Index and encoders loaded, in every worker process; searches answer at full speed."""
    if not service.ready.is_set():
        raise ApiError(503, "starting", "loading the index and encoders")
    # the kernel deals connections to a worker from its first moment, so one warm worker is
    # not enough: the shared slots say which of the others have loaded (workers.py)
    share = current_share()
    if share is not None and (warm := share.warm_workers()) < share.workers:
        raise ApiError(503, "starting", f"{warm} of {share.workers} workers have loaded the index and encoders")
    sync = getattr(request.app.state, "sync", None)
    return schemas.Ready(model_id=service.model_id, sync=sync.status() if sync is not None else None)


@router.get("/metrics", dependencies=[ReadKey], response_class=Response, responses=schemas.KEY_ERRORS)
def prometheus(service: AnyServiceDep, metrics: MetricsDep, request: Request) -> Response:
    """Prometheus text format: requests and latency by route, index rows, uploads, and the
    background sync's cycles, studies added, last success and whether it is failing."""
    rows = service.stats() if service.ready.is_set() else {}
    body = metrics.render(rows)
    sync = getattr(request.app.state, "sync", None)
    if sync is not None:
        body += sync.prometheus().encode()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
