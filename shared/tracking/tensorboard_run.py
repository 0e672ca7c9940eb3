"""The TensorBoard backend: event files beside the job's outputs in the store.

Each stage writes event files (tensorboardX: the format TensorBoard reads, without
TensorFlow or the TensorBoard server in the images) into a local folder and uploads them
under ``jobs/<id>/tracking/tensorboard/``, so the run's curves and evaluation scalars sit
together: ``tensorboard --logdir <store>/jobs`` shows every job, one run each.

While training runs, the curves reach the store too: tensorboardX writes from a queue it
cannot be asked to empty, so ``sync`` closes the stage's current file (closing drains the
queue), uploads it and opens the next one, at most every ``ROTATE_EVERY_S``. TensorBoard
reads a run's files in order as one. What the run holds is read back from the stored files
(``logged``), so a resumed attempt does not log an earlier attempt's steps again.
Parameters and tags are text (a Markdown table); the report itself stays in the job's
``evaluate/`` folder, and there is no model registry.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

from shared.store import Store
from shared.tracking.base import TrackedRun, flatten

PREFIX = "tracking/tensorboard"


class TensorBoardRun(TrackedRun):
    """One stage's writer of the job's TensorBoard run."""

    backend = "tensorboard"

    #: the shortest time between two files of a stage while it trains (``sync``)
    ROTATE_EVERY_S = 60.0

    def __init__(self, store: Store, prefix: str, folder: Path, stage: str) -> None:
        self.store, self.prefix, self.folder, self.stage = store, prefix, folder, stage
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the live thread syncs while the stage logs
        self._uploaded: set[Path] = set()
        self._rotated_at = time.monotonic()
        self._dirty = False
        self.writer = self._open()

    def _open(self) -> Any:
        from tensorboardX import SummaryWriter

        # The file's own time to the nanosecond and its stage in the name: files of one run
        # (stages, parts, attempts; any host) never share a name, and TensorBoard, which reads
        # a run's files in name order, reads them in the order they were written.
        suffix = f".{time.time_ns():020d}.{self.stage}"
        return SummaryWriter(logdir=str(self.folder), filename_suffix=suffix)

    def _upload_closed(self) -> None:
        """Store the files written so far that are not stored yet (all closed)."""
        for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
            if path not in self._uploaded:
                self.store.upload_file(path, f"{self.prefix}/{path.name}")
                self._uploaded.add(path)

    def ref(self) -> dict[str, Any]:
        return {"backend": "tensorboard", "location": self.store.uri(self.prefix), "url": None}

    def log_params(self, params: dict[str, Any]) -> None:
        with self._lock:
            self.writer.add_text("params", _table(flatten(params)), 0)
            self._dirty = True

    def log_metrics(self, rows: list[tuple[str, float, int]]) -> None:
        with self._lock:
            for name, value, step in rows:
                self.writer.add_scalar(name, float(value), step)
            self._dirty = bool(rows) or self._dirty

    def sync(self) -> None:
        """What was logged so far, in the store: the current file closed, stored and
        followed by a new one (not more often than every ``ROTATE_EVERY_S``)."""
        with self._lock:
            if not self._dirty or time.monotonic() - self._rotated_at < self.ROTATE_EVERY_S:
                return
            self.writer.close()
            self._upload_closed()
            self.writer = self._open()
            self._rotated_at, self._dirty = time.monotonic(), False

    def logged(self, names: set[str]) -> set[tuple[str, int]]:
        """The (name, step) scalars of ``names`` in the run's stored files (an earlier
        attempt's included)."""
        held: set[tuple[str, int]] = set()
        for key in self.store.list(self.prefix):
            for tag, step in scalars(self.store.get_bytes(key)):
                if tag in names:
                    held.add((tag, step))
        return held

    def log_text(self, artifact_file: str, text: str) -> None:
        """The report's files are in the job's own folder of the store: not copied."""

    def log_dict(self, artifact_file: str, data: Any) -> None:
        """As ``log_text``: the report is in the job's own folder."""

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self.writer.add_text("tags", _table(tags), 0)
            self._dirty = True

    def finish_stage(self) -> None:
        """The stage's files complete (the writer closed: its queue written out), stored."""
        with self._lock:
            self.writer.close()
            self._upload_closed()

    def end(self, status: str = "FINISHED") -> None:
        self.writer.add_text("status", status, 0)
        self.finish_stage()


def scalars(data: bytes) -> list[tuple[str, int]]:
    """The (tag, step) of each scalar in an event file's bytes (TFRecord framing: length,
    its CRC, the Event, its CRC); a record cut short (a writer killed mid-write) ends it."""
    from tensorboardX.proto.event_pb2 import Event

    found, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        start, end = at + 12, at + 12 + length
        if end + 4 > len(data):
            break
        try:
            event = Event.FromString(data[start:end])
        except Exception:  # noqa: BLE001 (protobuf's DecodeError: a damaged record ends it)
            break
        found += [
            (v.tag, int(event.step)) for v in event.summary.value if v.HasField("simple_value")
        ]
        at = end + 4
    return found


def _table(values: dict[str, Any]) -> str:
    """A Markdown table (TensorBoard's text tab renders it)."""
    rows = [
        f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in values.items()
    ]
    return "\n".join(["| name | value |", "|---|---|", *rows])
