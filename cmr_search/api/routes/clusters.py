"""Clusters: HDBSCAN clusters of the study embeddings."""

from __future__ import annotations

from fastapi import APIRouter

from cmr_search.api import schemas
from cmr_search.api.deps import ReadKey, ServiceDep, off_loop

router = APIRouter(prefix="/clusters", tags=["clusters"], dependencies=[ReadKey], responses=schemas.KEY_ERRORS)


@router.get("")
async def clusters(svc: ServiceDep) -> schemas.ClusterList:
    """HDBSCAN clusters of the study embeddings (cached per model and table version)."""
    return await off_loop(svc.clusters)
