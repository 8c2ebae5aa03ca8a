"""Search: text-to-scan and scan-to-scan.

Both run on the searches' own thread(s) (``SearchLimiterDep``), never the general pool: a
slow upload or cine there cannot hold a search back. A text query's encoding is awaited
on the encoder's batching thread, holding no thread of either.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from cmr_search.api import schemas
from cmr_search.api.deps import (
    ReadKey,
    SearchLimiterDep,
    ServiceDep,
    check_k,
    off_loop,
    parse_filters,
)

router = APIRouter(tags=["search"], dependencies=[ReadKey], responses=schemas.ERRORS)


@router.post("/search/text")
async def search_text(query: schemas.TextQuery, svc: ServiceDep, searches: SearchLimiterDep) -> schemas.SearchResult:
    """Text-to-scan: studies ranked by the similarity of their embedding to the encoded query,
    each with what its report (or a head) says of the query's findings."""
    check_k(query.k, svc)  # before the text is encoded
    # the encoder's batcher thread encodes it together with whatever else is waiting; no
    # pool thread waits for it, so a burst of text queries fills whole batches
    vector = await asyncio.wrap_future(svc.encode_text.submit(query.query))
    # the explanation (reports read and parsed, heads run: about 10 ms for 10 hits) stays on
    # the searches' thread too, so that a busy pool holds no text search back
    return await off_loop(svc.search_text, query, vector, limiter=searches)


@router.get("/studies/{study_uid}/neighbors")
async def neighbors(study_uid: str, svc: ServiceDep, searches: SearchLimiterDep,
                    k: Annotated[int, Query(ge=1, le=10_000)] = 10,
                    filters: Annotated[str | None, Query(description='JSON, e.g. {"sex": "F", "view": "SAX"}')] = None,
                    exclude_same_patient: bool = False) -> schemas.NeighborList:
    """Scan-to-scan: the k nearest other studies (optionally not the same patient's)."""
    where = parse_filters(filters)
    return await off_loop(svc.neighbors, study_uid, check_k(k, svc), where, exclude_same_patient, limiter=searches)
