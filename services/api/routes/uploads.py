"""/v1/uploads: dataset files and base model folders put into the object store.

A body is streamed to a temporary file (hashed on the way, refused past
TERMTUNE_MAX_UPLOAD_BYTES) and only then copied into the store, so a failed or cut-off
upload leaves nothing there. Locations are content-addressed (shared.uploads): the same
bytes uploaded again answer the same location.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator

from services.api.deps import JobsDep, SettingsDep
from shared.api_models import DatasetUpload, ModelFileUpload, ModelManifest, ModelUpload
from shared.errors import NotFound, StoreUnavailable
from shared.settings import ApiSettings
from shared.uploads import (
    DATASET_SUFFIXES,
    MAX_NAME,
    NAME_RULE,
    check_dataset_name,
    check_model_path,
    finish_model,
    model_prefix,
    read_marker,
    store_dataset,
    store_model_file,
)

router = APIRouter(prefix="/uploads", tags=["uploads"])

_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
DatasetName = Annotated[
    str,
    Path(
        max_length=MAX_NAME,
        description=f"The file's name: {NAME_RULE}; ending in {', '.join(DATASET_SUFFIXES)}.",
    ),
    AfterValidator(check_dataset_name),
]
Digest = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 over the folder's sorted '<file> <sha256>' lines.",
    ),
]
ModelPath = Annotated[
    str,
    Path(max_length=700, description="The file's path inside the folder, /-separated."),
    AfterValidator(check_model_path),
]


@dataclass(frozen=True)
class Received:
    """A request body on local disk."""

    path: FilePath
    sha256: str
    bytes: int


@router.put("/datasets/{filename}", openapi_extra=_RAW_BODY)
async def upload_dataset(
    filename: DatasetName, request: Request, jobs: JobsDep, settings: SettingsDep
) -> DatasetUpload:
    """Put a dataset file (the raw body) into the store; give the answer's ``location`` as
    ``dataset.source``."""
    async with _received(request, settings) as received:
        if received.bytes == 0:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the file is empty")
        key = await run_in_threadpool(
            store_dataset, jobs.store, received.path, sha256=received.sha256, filename=filename
        )
    return DatasetUpload(location=jobs.store.uri(key), sha256=received.sha256, bytes=received.bytes)


@router.put("/models/{digest}/{path:path}", openapi_extra=_RAW_BODY)
async def upload_model_file(
    digest: Digest, path: ModelPath, request: Request, jobs: JobsDep, settings: SettingsDep
) -> ModelFileUpload:
    """Put one file of a model folder (the raw body) into the store; the folder is used
    only once ``POST /v1/uploads/models/{digest}`` has checked every file."""
    async with _received(request, settings) as received:
        await run_in_threadpool(
            store_model_file,
            jobs.store,
            received.path,
            digest=digest,
            path=path,
            sha256=received.sha256,
            size=received.bytes,
        )
    return ModelFileUpload(path=path, sha256=received.sha256, bytes=received.bytes)


@router.post("/models/{digest}")
def finish_model_upload(digest: Digest, manifest: ModelManifest, jobs: JobsDep) -> ModelUpload:
    """Check that every file of the manifest arrived with its SHA-256 and mark the folder
    finished (409 naming what is missing); give the answer's ``location`` as base_model."""
    marker = finish_model(jobs.store, digest, manifest.by_path())
    return _model_upload(jobs, digest, marker)


@router.get("/models/{digest}")
def get_model_upload(digest: Digest, jobs: JobsDep) -> ModelUpload:
    """A finished model upload; 404 while it is not finished."""
    marker = read_marker(jobs.store, digest)
    if marker is None:
        raise NotFound(f"no finished model upload {digest}")
    return _model_upload(jobs, digest, marker)


def _model_upload(jobs: JobsDep, digest: str, marker: dict[str, Any]) -> ModelUpload:
    return ModelUpload(
        location=jobs.store.uri(model_prefix(digest)),
        digest=digest,
        files=marker["files"],
        bytes=marker["bytes"],
    )


@contextlib.asynccontextmanager
async def _received(request: Request, settings: ApiSettings) -> AsyncIterator[Received]:
    """The request body in a temporary file, hashed; removed afterwards whatever happens."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    folder = settings.cache_dir / "uploads"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".upload-")
    except OSError as exc:
        raise _disk_error(exc, folder) from exc
    path, digest, size = FilePath(name), hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                digest.update(chunk)
                fh.write(chunk)
        yield Received(path=path, sha256=digest.hexdigest(), bytes=size)
    except OSError as exc:
        raise _disk_error(exc, folder) from exc
    finally:
        path.unlink(missing_ok=True)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the file is over {limit} bytes (TERMTUNE_MAX_UPLOAD_BYTES); nothing was stored",
    )


def _disk_error(exc: OSError, folder: FilePath) -> Exception:
    """A full disk as a retryable error naming the folder (503); others as they are."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnavailable(f"no space left to receive the upload in {folder}")
    return exc
