"""Wiring of the trainer worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.trainer.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the trainer worker until SIGTERM; `--health` checks its heartbeat."""
    # Training outlasts broker delivery timeouts: the job is owned through a lease instead
    # (as every stage is).
    return run_service("trainer", handle, argv, leased=True)  # type: ignore[arg-type]
