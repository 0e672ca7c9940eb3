"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from services.api.deps import BusDep, JobsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(jobs: JobsDep, bus: BusDep) -> dict[str, Any]:
    """The store and the broker answer."""
    try:
        jobs.store.list("models")
        bus.connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"not ready: {exc}") from exc
    return {"status": "ready"}
