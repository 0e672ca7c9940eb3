"""A worker's health: a heartbeat file it touches every few seconds.

Kept apart from the worker loop so that ``python -m services.<name> --health`` (the image's
HEALTHCHECK) answers in a few tens of milliseconds: it imports neither torch, transformers
nor the broker (those took 6-32 s against a 5 s check timeout), nor even pydantic (half a
second in a cold container): the heartbeat's folder is read from the environment the way
``Settings.run_dir`` reads it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings


def heartbeat_path(settings: Settings, service: str) -> Path:
    """Where a service's heartbeat file lives."""
    return settings.run_dir / f"{service}.heartbeat"


def run_dir_from_env() -> Path:
    """``Settings().run_dir`` without pydantic: TERMTUNE_VAR_DIR (any case, as
    pydantic-settings matches it) or ./var, resolved, then ``run``."""
    var_dir = next(
        (value for key, value in os.environ.items() if key.upper() == "TERMTUNE_VAR_DIR"), "var"
    )
    return Path(var_dir).resolve() / "run"


def _fresh(path: Path, max_age: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < max_age
    except FileNotFoundError:
        return False


def check_health(settings: Settings, service: str, *, max_age: float = 30.0) -> bool:
    """Whether the service's heartbeat is recent."""
    return _fresh(heartbeat_path(settings, service), max_age)


def health_exit_code(service: str) -> int:
    """0 when the service's heartbeat is recent, else 1 (for ``--health``)."""
    return 0 if _fresh(run_dir_from_env() / f"{service}.heartbeat", 30.0) else 1
