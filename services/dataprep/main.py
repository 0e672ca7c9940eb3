"""Wiring of the dataprep worker: settings, broker, store, then the consume loop."""

from __future__ import annotations

from services.dataprep.handler import handle
from shared.worker import run_service


def main(argv: list[str] | None = None) -> int:
    """Run the dataprep worker until SIGTERM; `--health` checks its heartbeat."""
    return run_service("dataprep", handle, argv)  # type: ignore[arg-type]
