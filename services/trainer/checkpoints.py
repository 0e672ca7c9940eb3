"""Resumable checkpoints in the object store: uploaded whole, then pointed at (last).

The two newest are kept. Resuming takes the newest that is whole (its trainer state reads
and its adapter weights open): a checkpoint deleted or cut short (a full disk, a hand in
the bucket) falls back to the one before it, with the reason logged, instead of failing
the job and every retry.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from shared.errors import NotFound
from shared.modeling import unreadable_weights
from shared.store import Store

log = logging.getLogger(__name__)
KEEP = 2
#: files a checkpoint cannot resume without (the Trainer's state and the adapter)
REQUIRED = ("trainer_state.json", "adapter_model.safetensors")


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
        except (NotFound, ValueError, KeyError, TypeError):
            return None

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders in the store, newest first."""
        found = {
            int(part[len("step-") :])
            for key in self.store.list(self.prefix)
            for part in key[len(self.prefix) + 1 :].split("/")[:1]
            if part.startswith("step-") and part[len("step-") :].isdigit()
        }
        return sorted(found, reverse=True)

    def upload(self, folder: Path, step: int) -> None:
        """Store a checkpoint folder, then point at it; all but the newest KEEP are deleted."""
        self.store.upload_dir(folder, f"{self.prefix}/step-{step:08d}")
        self.store.put_json(self.pointer, {"step": step, "prefix": f"step-{step:08d}"})
        for old in [s for s in self.steps() if s != step][KEEP - 1 :]:
            self.store.delete_prefix(f"{self.prefix}/step-{old:08d}")

    def download_latest(self, output_dir: Path) -> Path | None:
        """The newest whole checkpoint as ``output_dir/checkpoint-<step>`` for the Trainer,
        or None (training starts over) when there is none."""
        pointed = self.latest_step()
        candidates = sorted({*self.steps(), *([pointed] if pointed is not None else [])})
        for step in reversed([s for s in candidates if pointed is None or s <= pointed]):
            target = self._download(step, output_dir)
            problem = whole(target)
            if problem is None:
                return target
            log.warning("checkpoint at step %d cannot be resumed (%s); trying an older one",
                        step, problem)  # fmt: skip
            shutil.rmtree(target, ignore_errors=True)
        if candidates:
            log.warning("no checkpoint of %s can be resumed; training starts over", self.prefix)
        return None

    def _download(self, step: int, output_dir: Path) -> Path:
        target = output_dir / f"checkpoint-{step}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        folder = f"step-{step:08d}/"
        for key in self.store.list(f"{self.prefix}/step-{step:08d}"):
            path = target / key.split(folder, 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            self.store.download_file(key, path)
        return target


def whole(folder: Path) -> str | None:
    """Why a downloaded checkpoint cannot be resumed (naming the file), or None."""
    for name in REQUIRED:
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"trainer_state.json is not JSON ({exc})"
    return unreadable_weights(folder / "adapter_model.safetensors")
