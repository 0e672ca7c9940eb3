"""Annotated dependencies of the routes: settings, job records, bus, models, auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.inference import BedrockModels, LocalModels
from shared.bus import Bus
from shared.jobs import JobRecords
from shared.settings import ApiSettings

_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> ApiSettings:
    """The app's settings."""
    return request.app.state.settings


def get_jobs(request: Request) -> JobRecords:
    """Job records in the object store."""
    return request.app.state.jobs


def get_bus(request: Request) -> Bus:
    """The message bus."""
    return request.app.state.bus


def get_models(request: Request) -> LocalModels:
    """Locally served published models."""
    return request.app.state.models


def get_bedrock(request: Request) -> BedrockModels:
    """Models imported into Amazon Bedrock."""
    return request.app.state.bedrock


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse a request without the configured bearer key (constant-time comparison)."""
    expected: str = request.app.state.api_key
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
JobsDep = Annotated[JobRecords, Depends(get_jobs)]
BusDep = Annotated[Bus, Depends(get_bus)]
ModelsDep = Annotated[LocalModels, Depends(get_models)]
BedrockDep = Annotated[BedrockModels, Depends(get_bedrock)]
