"""/v1/models: published models and invoking them in Bedrock's shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from services.api.deps import JobsDep, ModelsDep
from services.api.inference import InvokeRequest, InvokeResponse
from shared.errors import NotFound

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(jobs: JobsDep) -> dict[str, Any]:
    """Every published model."""
    return {"data": jobs.models()}


@router.get("/{name}")
def get_model(name: str, jobs: JobsDep) -> dict[str, Any]:
    """One published model."""
    try:
        return jobs.model(name)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@router.post("/{name}/invoke")
def invoke_model(
    name: str, request: InvokeRequest, jobs: JobsDep, models: ModelsDep
) -> InvokeResponse:
    """Ask a published model (the local target) a question."""
    try:
        entry = jobs.model(name)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    if entry.get("target") != "local":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model {name!r} is published to {entry.get('target')}, not served here",
        )
    return models.invoke(name, request)
