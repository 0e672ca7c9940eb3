"""A small typed client of the control plane's HTTP API (httpx)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from shared.api_models import (
    DatasetUpload,
    Estimate,
    EvaluationReport,
    EventPage,
    EventView,
    ImportedModelList,
    JobPage,
    JobView,
    ModelDeleted,
    ModelEntry,
    ModelFileUpload,
    ModelList,
    ModelManifest,
    ModelUpload,
    invoke_response_shape,
)
from shared.errors import NotFound, RetryableError, SpecError, TermtuneError
from shared.uploads import file_sha256, folder_digest, model_files, upload_name

#: answers of a proxy or of a control plane whose database is down: a later try may succeed
TRANSIENT_STATUSES = frozenset({502, 503, 504})
#: how long the control plane may fail in a row before a wait or a stream gives up
RETRY_PATIENCE_S = 300.0
JOB_PAGE_MAX = 200  # the API's largest page of jobs
#: the answer to an upload comes once the server has copied the file into the store
UPLOAD_TIMEOUT = httpx.Timeout(120.0, read=1800.0)


def default_url() -> str:
    """The embedded control plane: this machine, on TERMTUNE_PORT (8000 if unset)."""
    return local_url(os.environ.get("TERMTUNE_PORT") or 8000)


def local_url(port: int | str) -> str:
    """The control plane this machine runs, at TERMTUNE_HOST (where it listens; one that
    listens on every address is asked on the loopback one)."""
    host = os.environ.get("TERMTUNE_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ApiError(TermtuneError):
    """The control plane answered with an error."""


class ApiUnavailable(ApiError, RetryableError):
    """The control plane could not be reached, or answered 502, 503 or 504."""


class Backoff:
    """Waits between tries after transient failures: 0.5 s doubling to 10 s, for at most
    ``patience`` seconds of failures in a row (``reset`` after a success)."""

    def __init__(self, patience: float = RETRY_PATIENCE_S) -> None:
        self.patience = patience
        self.reset()

    def reset(self) -> None:
        """A try succeeded: the next failure starts a new count."""
        self.since: float | None = None
        self.delay = 0.5

    def failed(self, exc: Exception, what: str) -> None:
        """Sleep before the next try; an ``ApiError`` once failures have lasted ``patience``."""
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since >= self.patience:
            raise ApiError(
                f"gave up {what}: the control plane failed for {self.patience:.0f} s in a row "
                f"({exc})"
            ) from exc
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 10.0)


class Client:
    """Calls /v1 of the control plane with a bearer key."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        url = url or os.environ.get("TERMTUNE_API_URL") or default_url()
        key = api_key or os.environ.get("TERMTUNE_API_KEY") or _key_from_file()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, shape: type[BaseModel], **kwargs: Any) -> Any:
        """The answer to a request, read through ``shape`` (see ``_as``)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnavailable(
                f"cannot reach the control plane at {self.http.base_url}: {exc} "
                "(is `termtune up` running? set TERMTUNE_API_URL)"
            ) from exc
        _raise_for_status(response)
        try:
            data = response.json()
        except ValueError as exc:  # a wrong TERMTUNE_API_URL: some other web server
            raise ApiError(
                f"{response.request.url} answered HTTP {response.status_code} with a body that "
                "is not JSON: not the termtune API's answer (set TERMTUNE_API_URL)"
            ) from exc
        return _as(shape, data, where=f"{response.request.url}")

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job spec; the new job."""
        return self._call("POST", "/v1/jobs", JobView, json=spec)

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's summary."""
        return self._call("GET", f"/v1/jobs/{job_id}", JobView)

    def jobs(self, status: str | None = None, limit: int | None = 20) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally only those with a status: the newest ``limit``, or
        every one (``limit=None``), page after page."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while limit is None or len(found) < limit:
            size = JOB_PAGE_MAX if limit is None else min(JOB_PAGE_MAX, limit - len(found))
            params = {"limit": size, "status": status, "after": after}
            wanted = {k: v for k, v in params.items() if v is not None}
            page = self._call("GET", "/v1/jobs", JobPage, params=wanted)
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
            page = self._call("GET", f"/v1/jobs/{job_id}/events?after={after}", EventPage)
            found += page["data"]
            after, more = page["last_seq"], page["has_more"]
        return found

    def stream_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """A job's events as they happen (Server-Sent Events), until the job ends, each as
        ``events`` gives it (its ``seq`` too); a broken stream, or a 502/503, is resumed
        after the last event seen (``Last-Event-ID``), with a growing wait between tries
        that starts again after each event received."""
        last: str | None = None
        backoff = Backoff()
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    _check_stream(response)
                    for kind, data, seq in _sse_events(_sse_lines(response.iter_text())):
                        if kind == "end":
                            return
                        event = _event(data, seq, where=f"{response.request.url}")
                        last = seq
                        backoff.reset()
                        yield event
                raise ApiUnavailable("the stream ended before the job did")
            except (httpx.TransportError, ApiUnavailable) as exc:
                backoff.failed(exc, f"following job {job_id}'s events from {self.http.base_url}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop."""
        return self._call("POST", f"/v1/jobs/{job_id}/cancel", JobView)

    def estimate(
        self, job_id: str, instance_type: str, *, spec: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Training time and cost of a prepared job on an instance type; Bedrock's cost."""
        body = {"job_id": job_id, "instance_type": instance_type, "spec": spec}
        return self._call("POST", "/v1/estimate", Estimate, json=body)

    def retry(self, job_id: str) -> dict[str, Any]:
        """Resume a failed or cancelled job from its first unfinished stage."""
        return self._call("POST", f"/v1/jobs/{job_id}/retry", JobView)

    def report(self, job_id: str) -> dict[str, Any]:
        """A job's evaluation report."""
        return self._call("GET", f"/v1/jobs/{job_id}/report", EvaluationReport)

    def models(self) -> list[dict[str, Any]]:
        """Published models."""
        return self._call("GET", "/v1/models", ModelList)["data"]

    def model(self, model: str) -> dict[str, Any]:
        """One published model."""
        return self._call("GET", f"/v1/models/{model}", ModelEntry)

    def imported_models(self) -> list[dict[str, Any]]:
        """Every model imported into Bedrock in the account and region."""
        return self._call("GET", "/v1/imported-models", ImportedModelList)["data"]

    def delete_model(self, model: str) -> dict[str, Any]:
        """Delete a published model (and its Bedrock import)."""
        return self._call("DELETE", f"/v1/models/{model}", ModelDeleted)

    def invoke(self, model: str, prompt: str, **params: Any) -> dict[str, Any]:
        """Ask a published model; Bedrock's response shape."""
        return self.invoke_body(model, {"prompt": prompt, **params})

    def invoke_body(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Ask a published model in any shape Bedrock serves (Bedrock completion, OpenAI
        completion, OpenAI chat completions); the answer in the same shape."""
        shape = invoke_response_shape(body)
        return self._call("POST", f"/v1/models/{model}/invoke", shape, json=body)

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        """Put a local dataset file into the store (streamed); its location there."""
        name = upload_name(path.name)
        return self._put(f"/v1/uploads/datasets/{name}", path, DatasetUpload)

    def upload_model(self, folder: Path) -> dict[str, Any]:
        """Put a local model folder's files into the store and finish the upload (files are
        sent only when the store lacks this folder); its location there."""
        files = model_files(folder)
        shas = {name: file_sha256(path) for name, path in files.items()}
        prefix = f"/v1/uploads/models/{folder_digest(shas)}"
        try:
            return self._call("GET", prefix, ModelUpload)
        except NotFound:
            pass
        for name, path in files.items():
            self._put(f"{prefix}/{name}", path, ModelFileUpload)
        manifest = ModelManifest.model_validate(
            {"files": [{"path": name, "sha256": sha} for name, sha in shas.items()]}
        )
        return self._call("POST", prefix, ModelUpload, json=manifest.model_dump())

    def _put(self, path: str, file: Path, shape: type[BaseModel]) -> Any:
        """PUT a file as the raw body, streamed from disk."""
        with file.open("rb") as body:
            headers = {"Content-Type": "application/octet-stream"}
            return self._call(
                "PUT", path, shape, content=body, headers=headers, timeout=UPLOAD_TIMEOUT
            )

    def healthy(self) -> bool:
        """Whether /healthz answers."""
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


def _as(model: type[BaseModel], data: Any, *, where: str) -> Any:
    """The response read through the API's own model, as plain data with only the fields
    the server sent; an ``ApiError`` naming ``where`` and the wrong fields for an answer of
    another shape (another server on that address, or a termtune of another version)."""
    try:
        return model.model_validate(data).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise ApiError(
            f"{where} answered JSON of the wrong shape ({_problems(exc)}): not the answer of "
            "this termtune's API (check TERMTUNE_API_URL, and that client and server are one "
            "version)"
        ) from exc


def _problems(exc: ValidationError, shown: int = 3) -> str:
    """The first few of a validation's errors, one clause each."""
    errors = exc.errors(include_url=False)
    said = [
        f"{'.'.join(str(p) for p in e['loc']) or 'the answer'}: {e['msg']}" for e in errors[:shown]
    ]
    more = f"; {len(errors) - shown} more" if len(errors) > shown else ""
    return "; ".join(said) + more


def _sse_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of an event stream, split only where SSE splits them (CRLF, CR, LF):
    httpx's ``iter_lines`` also splits at U+2028, U+2029 and U+0085, which JSON leaves
    unescaped inside a data line. A CR that ends a chunk waits for a LF in the next."""
    pending = ""
    for chunk in chunks:
        text = pending + chunk
        held = "\r" if text.endswith("\r") else ""
        parts = re.split(r"\r\n|\r|\n", text.removesuffix(held))
        pending = parts.pop() + held
        yield from parts
    if pending:  # the last line (a CR held for a LF that never came ended it)
        yield pending.removesuffix("\r")


def _sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event type, data, id) of each whole event of a Server-Sent Events stream: an
    event is whole at the blank line that ends it, whatever order its fields come in."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            if name:  # a line starting with ":" is a comment (a keep-alive)
                fields.setdefault(name, []).append(value.removeprefix(" "))
            continue
        if "data" in fields:
            kind = fields.get("event", ["message"])[-1]
            yield kind, "\n".join(fields["data"]), (fields.get("id") or [None])[-1]
        fields = {}


def _event(data: str, seq: str | None, *, where: str) -> dict[str, Any]:
    """One streamed event, with its sequence number (the SSE id) as ``events`` has it."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise ApiError(f"{where} streamed an event that is not JSON: {data[:200]!r}") from exc
    if not isinstance(event, dict) or seq is None or not (seq.isascii() and seq.isdigit()):
        raise ApiError(
            f"{where} streamed an event that is not a JSON object with a numeric id "
            f"(id {seq!r}, data {data[:200]!r}): not the termtune API's stream"
        )
    return _as(EventView, {**event, "seq": int(seq)}, where=where)


def _raise_for_status(response: httpx.Response) -> None:
    """The error an answer of 400 or more means (its body read)."""
    code = response.status_code
    if code == 404:
        raise NotFound(_detail(response))
    if code == 422:
        raise SpecError(_detail(response))
    if code in TRANSIENT_STATUSES:
        raise ApiUnavailable(f"HTTP {code}: {_detail(response)}")
    if code >= 400:
        raise ApiError(f"HTTP {code}: {_detail(response)}")


def _check_stream(response: httpx.Response) -> None:
    """The error an event stream's answer means: its status, or a body that is no stream."""
    if response.status_code >= 400:
        response.read()
        _raise_for_status(response)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        raise ApiError(
            f"{response.request.url} answered with no event stream: not the termtune API's "
            "answer (set TERMTUNE_API_URL)"
        )


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
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
