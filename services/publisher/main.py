"""Wiring of the publisher worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.publisher.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the publisher worker until SIGTERM; `--health` checks its heartbeat."""
    # Owned through a lease like every stage: a worker killed mid-command (even kill -9)
    # lets its lease expire, and the control plane's reconciler sends the command again.
    return run_service("publisher", handle, argv, leased=True)  # type: ignore[arg-type]
