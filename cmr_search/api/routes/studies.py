"""Studies: upload, metadata and views, each view's cine, predictions, withdrawal.

Each hands its store work to the general pool (``serve_threads``) in one hop. The upload's
loose files are counted by the form parser as it reads them: ``create_app`` gives this
router FastAPI's ``form_limits`` (it needs the settings; only the upload parses a form),
and the parser's refusal leaves as a 413 ``too_many_files``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import FileResponse

from cmr_search.api import schemas
from cmr_search.api.deps import MetricsDep, ReadKey, ServiceDep, WriteKey, off_loop
from cmr_search.api.errors import ServiceError

router = APIRouter(prefix="/studies", tags=["studies"], responses=schemas.ERRORS)


@router.post("", dependencies=[WriteKey],
             responses={409: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody}})
async def upload(files: Annotated[list[UploadFile], File(description="DICOM files of one study, or zips of them")],
                 request: Request, svc: ServiceDep, metrics: MetricsDep, persist: bool = True) -> schemas.UploadResult:
    """A new study (DICOM files or a zip): ingest, embed, and answer its neighbours and
    the heads' predictions; ``persist=false`` answers without storing anything."""
    gone = threading.Event()  # a client that leaves stops the work at the next stage, not minutes later
    watcher = asyncio.create_task(_watch_disconnect(request, gone))
    try:
        result = await off_loop(svc.upload, [(f.filename or "", f.file) for f in files], persist, gone.is_set)
    except ServiceError:
        metrics.uploads.labels("refused").inc()
        raise
    finally:
        watcher.cancel()
    metrics.uploads.labels("stored" if persist else "answered").inc()
    return result


async def _watch_disconnect(request: Request, gone: threading.Event, every_s: float = 0.5) -> None:
    """Set ``gone`` once the client has closed the connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    gone.set()


@router.get("/{study_uid}", dependencies=[ReadKey])
async def study(study_uid: str, svc: ServiceDep) -> schemas.StudyDetail:
    """A study's metadata and views, each with the URL of its cine loop."""
    return await off_loop(svc.study, study_uid)


@router.get("/{study_uid}/views/{clip_id}/cine", dependencies=[ReadKey], response_class=FileResponse)
async def cine(study_uid: str, clip_id: str, svc: ServiceDep) -> FileResponse:
    """One view's cine as an animated image (WebP or GIF), looping at the acquired heart rate."""
    path = await off_loop(svc.cine, study_uid, clip_id)
    return FileResponse(path, media_type=f"image/{svc.cines.fmt}", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/{study_uid}/predictions", dependencies=[ReadKey])
async def predictions(study_uid: str, svc: ServiceDep) -> schemas.PredictionList:
    """Every registered head of this encoder on the study, with its attention per view."""
    return await off_loop(svc.predictions, study_uid)


@router.delete("/{study_uid}", dependencies=[WriteKey])
async def delete(study_uid: str, svc: ServiceDep) -> schemas.Withdrawal:
    """Withdraw a study everywhere: clips, reports, labels, embeddings, indexes, caches."""
    return await off_loop(svc.delete, study_uid)
