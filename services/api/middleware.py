"""ASGI middleware of the control plane: the API key, request size limit, Prometheus metrics."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from shared.jobs import JOB_STATUSES, JobRecords

Scope = dict[str, Any]
#: HTTP methods counted by name; any other is counted as OTHER (labels stay bounded)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: query parameters that look like credentials: refused, and masked in access logs
SECRET_PARAMS = re.compile(
    r"(?i)(^|[?&])((?:api[_-]?)?key|token|access[_-]?token|secret)=[^&\s\"]*"
)


class BodyLimit:
    """Answers 413 with a JSON reason to a request body over ``limit`` bytes, whether it
    says its length up front or streams it (the body is read, at most ``limit`` + one
    chunk, before the app sees it). A PUT under a ``streamed`` path prefix passes unread:
    its route streams the body to disk under a limit of its own."""

    def __init__(self, app: Any, *, limit: int, streamed: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.streamed = app, limit, streamed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "PUT" and scope["path"].startswith(self.streamed)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)  # disconnect
                return
            chunks.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks)
        whole = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"request body over {self.limit} bytes", "type": "RequestTooLarge"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    """A receive callable that returns ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replay


class _JobsCollector:
    """Jobs by status, counted by the ledger at scrape time."""

    def __init__(self, jobs: JobRecords) -> None:
        self.jobs = jobs

    def collect(self) -> Any:
        counts = self.jobs.counts()
        jobs = GaugeMetricFamily("termtune_jobs", "Jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        models = GaugeMetricFamily("termtune_published_models", "Published models.")
        models.add_metric([], len(self.jobs.models()))
        yield models


def _route_label(scope: Scope) -> str:
    """The matched route's template with its router prefixes (``/v1/jobs/{job_id}``): the
    request path minus what the route's own template matched, plus that template."""
    route = getattr(scope.get("route"), "path", None)
    if route is None:
        return "unmatched"
    filled = route
    for name, value in (scope.get("path_params") or {}).items():
        filled = filled.replace(f"{{{name}}}", str(value)).replace(f"{{{name}:path}}", str(value))
    path = scope["path"]
    prefix = path[: len(path) - len(filled)] if path.endswith(filled) else ""
    return prefix + route


class Metrics:
    """Prometheus metrics of one app: HTTP requests and latency, jobs, models."""

    def __init__(self, jobs: JobRecords) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "termtune_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "termtune_http_request_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(jobs))

    def middleware(self, app: Any) -> Any:
        """An ASGI wrapper that counts and times every HTTP request."""

        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start, status = time.perf_counter(), 500

            async def record(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, record)
            finally:
                route = _route_label(scope)
                method = scope["method"] if scope["method"] in METHODS else "OTHER"
                self.requests.labels(method, route, str(status)).inc()
                self.latency.labels(method, route).observe(time.perf_counter() - start)

        return wrapped


class RequireKey:
    """Refuses a request to a protected path without the bearer key (constant-time
    comparison) before anything else reads it: 401 without a key, 403 with a wrong one."""

    def __init__(self, app: Any, *, key: str, prefixes: tuple[str, ...] = ("/v1", "/metrics")):
        self.app, self.key, self.prefixes = app, key.encode(), prefixes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and SECRET_PARAMS.search(
            scope.get("query_string", b"").decode("latin-1")
        ):
            await _json(
                send,
                401,
                "API keys in the URL are refused (URLs are logged): send "
                "the header Authorization: Bearer <key>",
            )
            return
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                await _json(send, 401, "missing bearer API key", [(b"www-authenticate", b"Bearer")])
                return
            if not secrets.compare_digest(token.strip(), self.key):
                await _json(send, 403, "invalid API key")
                return
        await self.app(scope, receive, send)


async def _json(
    send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


class SecurityHeaders:
    """Headers every response carries: no MIME sniffing, no framing, no referrer."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    )

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class RedactSecrets(logging.Filter):
    """Masks credential-like query parameters in log records (uvicorn's access log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                SECRET_PARAMS.sub(r"\1\2=[redacted]", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True
