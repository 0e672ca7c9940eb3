"""The TensorBoard backend: event files beside the job's outputs in the store.

Each stage writes its own event file (tensorboardX: the format TensorBoard reads, without
TensorFlow or the TensorBoard server in the images) into a local folder and uploads it under
``jobs/<id>/tracking/tensorboard/`` when its logging is done, so the run's curves and
evaluation scalars sit together: ``tensorboard --logdir <store>/jobs`` shows every job, one
run each. The store gets a stage's file when the stage ends, not while training runs:
tensorboardX writes from a queue it cannot be asked to empty. Parameters and tags are text (a
Markdown table); the report itself stays in the job's ``evaluate/`` folder, and there is no
model registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.store import Store
from shared.tracking.base import TrackedRun, flatten

PREFIX = "tracking/tensorboard"


class TensorBoardRun(TrackedRun):
    """One stage's writer of the job's TensorBoard run."""

    backend = "tensorboard"

    def __init__(self, store: Store, prefix: str, folder: Path, stage: str) -> None:
        from tensorboardX import SummaryWriter

        self.store, self.prefix, self.folder = store, prefix, folder
        folder.mkdir(parents=True, exist_ok=True)
        # The stage in the file name: two stages of one job on one host in the same second
        # would otherwise write (and upload) the same name.
        self.writer = SummaryWriter(logdir=str(folder), filename_suffix=f".{stage}")

    def ref(self) -> dict[str, Any]:
        return {"backend": "tensorboard", "location": self.store.uri(self.prefix), "url": None}

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("params", _table(flatten(params)), 0)

    def log_metrics(self, rows: list[tuple[str, float, int]]) -> None:
        for name, value, step in rows:
            self.writer.add_scalar(name, float(value), step)

    def log_text(self, artifact_file: str, text: str) -> None:
        """The report's files are in the job's own folder of the store: not copied."""

    def log_dict(self, artifact_file: str, data: Any) -> None:
        """As ``log_text``: the report is in the job's own folder."""

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", _table(tags), 0)

    def finish_stage(self) -> None:
        """The stage's file complete (the writer closed: its queue written out), stored."""
        self.writer.close()
        self.store.upload_dir(self.folder, self.prefix)

    def end(self, status: str = "FINISHED") -> None:
        self.writer.add_text("status", status, 0)
        self.finish_stage()


def _table(values: dict[str, Any]) -> str:
    """A Markdown table (TensorBoard's text tab renders it)."""
    rows = [
        f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in values.items()
    ]
    return "\n".join(["| name | value |", "|---|---|", *rows])
