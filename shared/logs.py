"""Log lines for people (text) or for log pipelines (JSON, one object a line), each carrying
the job it is about.

``TERMTUNE_LOG_FORMAT``: ``json``, ``text``, or ``auto`` (the default: text on a terminal,
JSON otherwise, as in a container). While a worker handles a command, every line logged on
its thread carries ``job_id``, ``stage``, ``attempt`` and ``message_type`` (`log_context`).
JSON lines are python-json-logger's, with the fields ``time`` (UTC, ISO 8601), ``level``,
``service``, ``logger``, ``message``, the context, and ``exc_info`` for a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("job_id", "stage", "attempt", "message_type")
_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("termtune_log")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside (on this thread) carries these fields (None ones left out)."""
    token = _CONTEXT.set({**_CONTEXT.get({}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current `log_context` fields on each record (a field given in ``extra=``
    wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _CONTEXT.get({}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """``time service LEVEL logger: message``, then ``[job stage #attempt]`` in context."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job_id", None)
        if job is None:
            return line
        where = " ".join(
            str(v) for v in (job, getattr(record, "stage", None), _attempt(record)) if v is not None
        )
        head, _, rest = line.partition("\n")  # a traceback stays below the line
        return f"{head} [{where}]" + (f"\n{rest}" if rest else "")


def _attempt(record: logging.LogRecord) -> str | None:
    attempt = getattr(record, "attempt", None)
    return None if attempt is None else f"#{attempt}"


def json_formatter(service: str) -> JsonFormatter:
    """One JSON object a line: time, level, service, logger, message, the job's context."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"service": service},
        timestamp="time",
        json_ensure_ascii=False,
    )


def wants_json(log_format: str, stream: TextIO) -> bool:
    """JSON when asked, or (``auto``) when the stream is not a terminal."""
    if log_format == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return log_format == "json"


def configure_logging(
    service: str, *, level: str, log_format: str, stream: TextIO | None = None
) -> logging.Handler:
    """The root logger's one handler, to stderr, in the chosen format; returned for tests
    and for filters a service adds (the API's secret redaction)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        json_formatter(service) if wants_json(log_format, stream) else TextFormatter(service)
    )
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn lines as log records, JSON too
    return handler
