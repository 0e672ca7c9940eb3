"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from services.api.deps import BusDep, JobsDep
from shared.api_models import Health

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz")
def readyz(jobs: JobsDep, bus: BusDep) -> Health:
    """The job database, the store and the broker answer."""
    try:
        jobs.counts()
        jobs.store.list("models")
        bus.connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"not ready: {exc}") from exc
    return Health(status="ready")
