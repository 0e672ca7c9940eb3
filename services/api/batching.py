"""Micro-batching: concurrent requests for one model answered by one ``generate`` call.

Dynamic batching without a timer by default: one thread per model takes the oldest request
and whatever else is already waiting (up to ``max_batch``); requests that arrive while a
batch runs form the next one. A lone request waits for nothing, a busy model batches.
``wait_s`` > 0 also holds the first request that long for company.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

_CLOSE = object()


@dataclass
class _Pending:
    request: Any
    future: Future[Any] = field(default_factory=Future)


class MicroBatcher:
    """Runs ``run(requests) -> answers`` (same order) on groups of requests with one ``key``."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        *,
        key: Callable[[Any], Hashable],
        max_batch: int,
        wait_s: float = 0.0,
        name: str = "batcher",
    ) -> None:
        self._run, self._key = run, key
        self.max_batch, self.wait_s = max_batch, wait_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Any, timeout: float | None = None) -> Any:
        """The answer to ``request`` (or the exception its batch raised)."""
        pending = _Pending(request)
        self._queue.put(pending)
        return pending.future.result(timeout)

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout=60)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, closing = [first], False
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _CLOSE:
                closing = True
                break
            batch.append(item)
        return batch, closing

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _CLOSE:
                return
            batch, closing = self._gather(first)
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(self._key(pending.request), []).append(pending)
            for group in groups.values():
                self._answer(group)
            if closing:
                return

    def _answer(self, group: list[_Pending]) -> None:
        self.batch_sizes.append(len(group))
        try:
            answers = self._run([p.request for p in group])
        except Exception as exc:  # noqa: BLE001 - each caller gets its batch's error
            for pending in group:
                pending.future.set_exception(exc)
            return
        for pending, answer in zip(group, answers, strict=True):
            pending.future.set_result(answer)
