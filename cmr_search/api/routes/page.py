"""The web page (``/``; its scripts and styles are the app's ``/static`` mount)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).parents[1] / "static"

router = APIRouter(tags=["page"], include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    """The search page (no data in it: it asks the API with the key the user enters)."""
    return FileResponse(STATIC / "index.html")
