"""Resumable checkpoints in the object store: uploaded whole, then pointed at (last)."""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.errors import NotFound
from shared.store import Store


class CheckpointStore:
    """The checkpoints of one job's training under ``jobs/<id>/train/checkpoints``."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix

    @property
    def pointer(self) -> str:
        """Key of the document naming the latest complete checkpoint."""
        return f"{self.prefix}/latest.json"

    def latest_step(self) -> int | None:
        """The optimizer step of the latest complete checkpoint, if any."""
        try:
            return int(self.store.get_json(self.pointer)["step"])
        except NotFound:
            return None

    def upload(self, folder: Path, step: int) -> None:
        """Store a checkpoint folder, then point at it; older ones are deleted after."""
        previous = self.latest_step()
        self.store.upload_dir(folder, f"{self.prefix}/step-{step:08d}")
        self.store.put_json(self.pointer, {"step": step, "prefix": f"step-{step:08d}"})
        if previous is not None and previous != step:
            self.store.delete_prefix(f"{self.prefix}/step-{previous:08d}")

    def download_latest(self, output_dir: Path) -> Path | None:
        """The latest checkpoint as ``output_dir/checkpoint-<step>`` for the Trainer, or None."""
        step = self.latest_step()
        if step is None:
            return None
        target = output_dir / f"checkpoint-{step}"
        shutil.rmtree(target, ignore_errors=True)
        for key in self.store.list(f"{self.prefix}/step-{step:08d}"):
            path = target / key.split(f"step-{step:08d}/", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            self.store.download_file(key, path)
        return target
