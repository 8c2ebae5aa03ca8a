"""Heads: the registered prediction heads."""

from __future__ import annotations

from fastapi import APIRouter

from cmr_search.api import schemas
from cmr_search.api.deps import ReadKey, ServiceDep, off_loop

router = APIRouter(prefix="/heads", tags=["heads"], dependencies=[ReadKey], responses=schemas.KEY_ERRORS)


@router.get("")
async def heads(svc: ServiceDep) -> list[schemas.HeadInfo]:
    """The registered heads with their cards' metrics."""
    return await off_loop(svc.heads)
