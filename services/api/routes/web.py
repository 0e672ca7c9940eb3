"""The web page: jobs, a job's timeline, loss chart and evaluation, a playground, a submit
form. One static file, no build step; it calls the same /v1 API with the user's key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

PAGE = Path(__file__).resolve().parents[1] / "web" / "index.html"
router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    """The page lives at /ui."""
    return RedirectResponse("/ui")


@router.get("/ui")
def page() -> FileResponse:
    """The single-page web interface (its data calls need the API key)."""
    return FileResponse(PAGE, media_type="text/html")
