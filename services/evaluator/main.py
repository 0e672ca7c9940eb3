"""Wiring of the evaluator worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.evaluator.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the evaluator worker until SIGTERM; `--health` checks its heartbeat."""
    return run_service("evaluator", handle, argv)  # type: ignore[arg-type]
