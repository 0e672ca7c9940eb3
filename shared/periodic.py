"""A function run every few seconds in a background thread, surviving its own errors: the
one loop behind the outbox relay, the reconciler, the trainer's stop poll, a worker's
heartbeat, its SQS visibility extension and its lease renewal."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn`` every ``every`` seconds (at once after ``kick()``) until stopped."""

    def __init__(self, name: str, every: float, fn: Callable[[], Any]) -> None:
        self.name, self.every, self.fn = name, every, fn
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.fn()
            except Exception as exc:  # noqa: BLE001 - keep going after a hiccup
                log.error("%s failed: %s", self.name, exc)

    def kick(self) -> None:
        """Run now rather than at the next tick."""
        self._wake.set()

    def start(self) -> None:
        """Begin."""
        self._thread.start()

    def stop(self) -> None:
        """Stop (waits for a run in progress, up to 5 s; from ``fn`` itself, at once)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> Periodic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
