"""The web page: jobs, a job's timeline, loss chart and evaluation, a playground, a submit
form. One static file, no build step; it calls the same /v1 API with the user's key."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

PAGE = Path(__file__).resolve().parents[1] / "web" / "index.html"
router = APIRouter(include_in_schema=False)


def content_security_policy(page: str) -> str:
    """The page's policy: its own inline script (by SHA-256) and nothing else runs; data
    goes only to this origin; no framing, no plugins, no base or form elsewhere."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    )
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    )


CSP = content_security_policy(PAGE.read_text(encoding="utf-8"))


@router.get("/")
def root() -> RedirectResponse:
    """The page lives at /ui."""
    return RedirectResponse("/ui")


@router.get("/ui")
def page() -> FileResponse:
    """The single-page web interface (its data calls need the API key)."""
    return FileResponse(PAGE, media_type="text/html", headers={"content-security-policy": CSP})
