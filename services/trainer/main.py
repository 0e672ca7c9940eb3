"""Wiring of the trainer worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.trainer.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the trainer worker until SIGTERM; `--health` checks its heartbeat."""
    return run_service("trainer", handle, argv)  # type: ignore[arg-type]
