"""A small typed client of the control plane's HTTP API (httpx)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from shared.api_models import (
    DatasetUpload,
    Estimate,
    EventPage,
    JobPage,
    JobView,
    ModelDeleted,
    ModelEntry,
    ModelFileUpload,
    ModelList,
    ModelManifest,
    ModelUpload,
)
from shared.errors import NotFound, SpecError, TermtuneError
from shared.uploads import file_sha256, folder_digest, model_files, upload_name

STREAM_RECONNECTS = 5
JOB_PAGE_MAX = 200  # the API's largest page of jobs
#: the answer to an upload comes once the server has copied the file into the store
UPLOAD_TIMEOUT = httpx.Timeout(120.0, read=1800.0)


def default_url() -> str:
    """The embedded control plane: this machine, on TERMTUNE_PORT (8000 if unset)."""
    return f"http://127.0.0.1:{os.environ.get('TERMTUNE_PORT') or 8000}"


class ApiError(TermtuneError):
    """The control plane answered with an error."""


class Client:
    """Calls /v1 of the control plane with a bearer key."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        url = url or os.environ.get("TERMTUNE_API_URL") or default_url()
        key = api_key or os.environ.get("TERMTUNE_API_KEY") or _key_from_file()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the control plane at {self.http.base_url}: {exc} "
                "(is `termtune up` running? set TERMTUNE_API_URL)"
            ) from exc
        if response.status_code == 404:
            raise NotFound(_detail(response))
        if response.status_code == 422:
            raise SpecError(_detail(response))
        if response.status_code >= 400:
            raise ApiError(f"HTTP {response.status_code}: {_detail(response)}")
        return response.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job spec; the new job."""
        return _as(JobView, self._call("POST", "/v1/jobs", json=spec))

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's summary."""
        return _as(JobView, self._call("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, status: str | None = None, limit: int | None = 20) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally only those with a status: the newest ``limit``, or
        every one (``limit=None``), page after page."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while limit is None or len(found) < limit:
            size = JOB_PAGE_MAX if limit is None else min(JOB_PAGE_MAX, limit - len(found))
            params = {"limit": size, "status": status, "after": after}
            page = _as(
                JobPage,
                self._call(
                    "GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None}
                ),
            )
            found += page["data"]
            if not page["has_more"]:
                break
            after = page["next_after"]
        return found

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first (every page)."""
        found: list[dict[str, Any]] = []
        after, more = 0, True
        while more:
            page = _as(EventPage, self._call("GET", f"/v1/jobs/{job_id}/events?after={after}"))
            found += page["data"]
            after, more = page["last_seq"], page["has_more"]
        return found

    def stream_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """A job's events as they happen (Server-Sent Events), until the job ends; a broken
        stream is resumed after the last event seen (``Last-Event-ID``)."""
        last: str | None = None
        for attempt in range(STREAM_RECONNECTS + 1):
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = NotFound if response.status_code == 404 else ApiError
                        raise error(_detail(response))
                    for line in response.iter_lines():
                        if line.startswith("id: "):
                            last = line[len("id: ") :]
                        elif line.startswith("event: end"):
                            return
                        elif line.startswith("data: ") and line != "data: {}":
                            yield json.loads(line[len("data: ") :])
                    return
            except httpx.TransportError as exc:
                if attempt == STREAM_RECONNECTS:
                    raise ApiError(f"event stream from {self.http.base_url} broke: {exc}") from exc

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop."""
        return _as(JobView, self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def estimate(
        self, job_id: str, instance_type: str, *, spec: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Training time and cost of a prepared job on an instance type; Bedrock's cost."""
        body = {"job_id": job_id, "instance_type": instance_type, "spec": spec}
        return _as(Estimate, self._call("POST", "/v1/estimate", json=body))

    def retry(self, job_id: str) -> dict[str, Any]:
        """Resume a failed or cancelled job from its first unfinished stage."""
        return _as(JobView, self._call("POST", f"/v1/jobs/{job_id}/retry"))

    def report(self, job_id: str) -> dict[str, Any]:
        """A job's evaluation report."""
        return self._call("GET", f"/v1/jobs/{job_id}/report")

    def models(self) -> list[dict[str, Any]]:
        """Published models."""
        return _as(ModelList, self._call("GET", "/v1/models"))["data"]

    def model(self, model: str) -> dict[str, Any]:
        """One published model."""
        return _as(ModelEntry, self._call("GET", f"/v1/models/{model}"))

    def imported_models(self) -> list[dict[str, Any]]:
        """Every model imported into Bedrock in the account and region."""
        return self._call("GET", "/v1/imported-models")["data"]

    def delete_model(self, model: str) -> dict[str, Any]:
        """Delete a published model (and its Bedrock import)."""
        return _as(ModelDeleted, self._call("DELETE", f"/v1/models/{model}"))

    def invoke(self, model: str, prompt: str, **params: Any) -> dict[str, Any]:
        """Ask a published model; Bedrock's response shape."""
        return self.invoke_body(model, {"prompt": prompt, **params})

    def invoke_body(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Ask a published model in any shape Bedrock serves (Bedrock completion, OpenAI
        completion, OpenAI chat completions); the answer in the same shape."""
        return self._call("POST", f"/v1/models/{model}/invoke", json=body)

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        """Put a local dataset file into the store (streamed); its location there."""
        name = upload_name(path.name)
        return _as(DatasetUpload, self._put(f"/v1/uploads/datasets/{name}", path))

    def upload_model(self, folder: Path) -> dict[str, Any]:
        """Put a local model folder's files into the store and finish the upload (files are
        sent only when the store lacks this folder); its location there."""
        files = model_files(folder)
        shas = {name: file_sha256(path) for name, path in files.items()}
        prefix = f"/v1/uploads/models/{folder_digest(shas)}"
        try:
            return _as(ModelUpload, self._call("GET", prefix))
        except NotFound:
            pass
        for name, path in files.items():
            _as(ModelFileUpload, self._put(f"{prefix}/{name}", path))
        manifest = ModelManifest.model_validate(
            {"files": [{"path": name, "sha256": sha} for name, sha in shas.items()]}
        )
        return _as(ModelUpload, self._call("POST", prefix, json=manifest.model_dump()))

    def _put(self, path: str, file: Path) -> Any:
        """PUT a file as the raw body, streamed from disk."""
        with file.open("rb") as body:
            headers = {"Content-Type": "application/octet-stream"}
            return self._call("PUT", path, content=body, headers=headers, timeout=UPLOAD_TIMEOUT)

    def healthy(self) -> bool:
        """Whether /healthz answers."""
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


def _as(model: type[BaseModel], data: Any) -> Any:
    """The response read through the API's own model (a drifted server fails here, naming
    the field), as plain data with only the fields the server sent."""
    return model.model_validate(data).model_dump(mode="json", exclude_unset=True)


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI's validation errors: one line per field
        return "; ".join(
            f"field '{'.'.join(str(p) for p in e.get('loc', ()))}': {e.get('msg', e)}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return detail if isinstance(detail, str) else str(detail)


def _key_from_file() -> str | None:
    path = Path(os.environ.get("TERMTUNE_VAR_DIR", "var")) / "run" / "api_key"
    return path.read_text().strip() if path.is_file() else None
