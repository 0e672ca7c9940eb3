"""Resumable checkpoints in the object store: uploaded whole, then pointed at (last).

The two newest are kept. Resuming takes the newest that is whole (its trainer state reads
and its adapter weights open): a checkpoint deleted or cut short (a full disk, a hand in
the bucket) falls back to the one before it, with the reason logged, instead of failing
the job and every retry. What it passed over is set aside (``set-aside/``, with why) and
the pointer names the checkpoint resumed from: a broken checkpoint is never resumed later,
nor kept by the next save in place of the one resumed from.
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
#: where checkpoints that cannot be resumed are moved, beside the step folders
SET_ASIDE = "set-aside"
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
        self._point_at(step)
        for old in [s for s in self.steps() if s != step][KEEP - 1 :]:
            self.store.delete_prefix(f"{self.prefix}/step-{old:08d}")

    def download_latest(self, output_dir: Path) -> Path | None:
        """The newest whole checkpoint as ``output_dir/checkpoint-<step>`` for the Trainer,
        or None (training starts over) when there is none; every newer one is set aside."""
        pointed = self.latest_step()
        candidates = sorted({*self.steps(), *([pointed] if pointed is not None else [])})
        for step in reversed(candidates):
            target = self._download(step, output_dir)
            problem = unfinished(step, pointed) or whole(target)
            if problem is None:
                if step != pointed:
                    self._point_at(step)
                return target
            self._set_aside(step, target, problem)
        if candidates:
            log.warning("no checkpoint of %s can be resumed; training starts over", self.prefix)
            self.store.delete(self.pointer)
        return None

    def _point_at(self, step: int) -> None:
        """Name a checkpoint as the latest complete one."""
        self.store.put_json(self.pointer, {"step": step, "prefix": f"step-{step:08d}"})

    def _set_aside(self, step: int, folder: Path, problem: str) -> None:
        """Move a checkpoint that cannot be resumed (as downloaded) under SET_ASIDE, with
        why: no later resume or save counts it among the stored checkpoints."""
        name = f"step-{step:08d}"
        aside = f"{self.prefix}/{SET_ASIDE}/{name}"
        stored = any(path.is_file() for path in folder.rglob("*"))
        if stored:
            self.store.delete_prefix(aside)  # an earlier one of the same step
            self.store.upload_dir(folder, aside)
            self.store.put_json(f"{aside}.json", {"step": step, "problem": problem})
            self.store.delete_prefix(f"{self.prefix}/{name}")
        where = f"set aside under {aside}" if stored else "nothing of it is stored"
        log.warning(
            "checkpoint at step %d cannot be resumed (%s; %s); trying an older one",
            step,
            problem,
            where,
        )
        shutil.rmtree(folder, ignore_errors=True)

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


def unfinished(step: int, pointed: int | None) -> str | None:
    """Why a checkpoint newer than the one the pointer names is not resumed, or None."""
    if pointed is None or step <= pointed:
        return None
    return f"latest.json names step {pointed}: its upload did not finish"


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
