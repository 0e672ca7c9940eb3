"""A worker's health: a heartbeat file it touches every few seconds.

Kept apart from the worker loop so that ``python -m services.<name> --health`` (the image's
HEALTHCHECK) answers in a fraction of a second: it imports settings only, never torch,
transformers or the broker (those took 6-32 s against a 5 s check timeout).
"""

from __future__ import annotations

import time
from pathlib import Path

from shared.settings import Settings


def heartbeat_path(settings: Settings, service: str) -> Path:
    """Where a service's heartbeat file lives."""
    return settings.run_dir / f"{service}.heartbeat"


def check_health(settings: Settings, service: str, *, max_age: float = 30.0) -> bool:
    """Whether the service's heartbeat is recent."""
    try:
        return time.time() - heartbeat_path(settings, service).stat().st_mtime < max_age
    except FileNotFoundError:
        return False


def health_exit_code(service: str) -> int:
    """0 when the service's heartbeat is recent, else 1 (for ``--health``)."""
    return 0 if check_health(Settings(), service) else 1
