"""The training curves in the job's run while it trains, not only when the stage ends.

The trainer's progress reports (every logging step; relayed from the first rank when
training is distributed) carry the figures; ``LiveCurves`` taps them, keeps them in a buffer
and sends them from a background thread every few seconds, so a slow or unreachable
tracking server never holds a training step. When the stage ends, what training's own log
holds and the run does not (steps between two reports, figures reports do not carry, an
earlier attempt's steps) is sent once: no step of a curve is logged twice.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

from shared.errors import TrackingUnavailable
from shared.periodic import Periodic
from shared.tracking.base import TrackedRun

log = logging.getLogger(__name__)

Row = tuple[str, float, int]
#: progress figures sent as curves, under their log-history names where they have one
FIGURES = ("loss", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s", "peak_memory_mb")


class LiveCurves:
    """Sends ``prefix``-named curves from progress reports to ``run`` every ``every`` s."""

    def __init__(self, run: TrackedRun, every: float, prefix: str = "train/") -> None:
        self.run, self.prefix = run, prefix
        self.pending: list[Row] = []
        self.sent: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.timer = Periodic("live-curves", every, self.flush)

    def tap(self, report: Callable[..., None]) -> Callable[..., None]:
        """``report``, also keeping the figures of each report for the run."""

        def tapped(progress: dict[str, Any], *, force: bool = False) -> None:
            self.add(progress)
            report(progress, force=force)

        return tapped

    def add(self, progress: dict[str, Any]) -> None:
        """A progress report's figures, at its step; the validation loss at the step it was
        measured (reports repeat the latest until the next)."""
        step = progress.get("step")
        if not isinstance(step, int) or "phase" in progress:
            return
        rows = [(name, progress.get(name), step) for name in FIGURES]
        if progress.get("eval_step") is not None:
            rows.append(("eval_loss", progress.get("eval_loss"), int(progress["eval_step"])))
        with self.lock:
            for name, value, at in rows:
                if _number(value) and (self.prefix + name, at) not in self.sent:
                    self.pending.append((self.prefix + name, float(value), at))
                    self.sent.add((self.prefix + name, at))

    def flush(self) -> None:
        """Send what is buffered (kept for the next try when the server does not answer)."""
        with self.lock:
            rows, self.pending = self.pending, []
        if not rows:
            return
        try:
            self.run.log_metrics(rows)
            self.run.sync()
        except TrackingUnavailable as exc:
            log.warning("training curves not sent yet (%d points kept): %s", len(rows), exc)
            with self.lock:
                self.pending = rows + self.pending

    def unsent(self, rows: Iterable[Row]) -> list[Row]:
        """Of ``rows`` (the stage's whole log), those the run does not hold yet."""
        rows = list(rows)
        with self.lock:
            held = self.sent - {(name, step) for name, _, step in self.pending}
        held |= self.run.logged({name for name, _, _ in rows})
        return [row for row in rows if (row[0], row[2]) not in held]

    def __enter__(self) -> LiveCurves:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()
        self.flush()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
