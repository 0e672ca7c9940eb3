"""Wiring of the publisher worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.publisher.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the publisher worker until SIGTERM; `--health` checks its heartbeat."""
    return run_service("publisher", handle, argv)  # type: ignore[arg-type]
