"""What every tracking backend's run does, and the names they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

JOB_TAG = "termtune.job_id"
#: log_history keys that are positions, not metrics
_POSITION_KEYS = {"step", "epoch"}


class TrackedRun(ABC):
    """The job's run in a tracking backend: what the stages log to it.

    ``finish_stage`` after a stage's logging (the run outlives the stage's process); ``end``
    when the job ends. A backend without a model registry registers nothing.
    """

    backend = ""
    url: str | None = None

    @abstractmethod
    def ref(self) -> dict[str, Any]:
        """What the manifests and the job's result keep of the run."""
        ...

    @abstractmethod
    def log_params(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, rows: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows."""
        ...

    def log_history(self, log_history: list[dict[str, Any]], prefix: str = "train/") -> None:
        """transformers' log history (loss, learning rate, validation loss...) by step."""
        self.log_metrics(history_rows(log_history, prefix))

    @abstractmethod
    def log_text(self, artifact_file: str, text: str) -> None: ...

    @abstractmethod
    def log_dict(self, artifact_file: str, data: Any) -> None: ...

    @abstractmethod
    def set_tags(self, tags: dict[str, str]) -> None: ...

    def register(
        self, name: str, location: str, folder: Path, tags: dict[str, str]
    ) -> dict[str, Any] | None:
        return None

    def tag_version(self, registered: dict[str, Any] | None, tags: dict[str, str]) -> None:
        return None

    def finish_stage(self) -> None:
        return None

    def sync(self) -> None:
        """What was logged so far, visible to the backend's readers (mid-stage)."""
        return None

    def logged(self, names: set[str]) -> set[tuple[str, int]]:
        """The (name, step) points of ``names`` the run already holds, where the backend can
        tell (an earlier attempt of the stage may have logged some)."""
        return set()

    @abstractmethod
    def end(self, status: str = "FINISHED") -> None: ...


def history_rows(log_history: list[dict[str, Any]], prefix: str) -> list[tuple[str, float, int]]:
    return [
        (prefix + key, value, int(entry.get("step", 0)))
        for entry in log_history
        for key, value in entry.items()
        if key not in _POSITION_KEYS and isinstance(value, int | float)
        if not isinstance(value, bool)
    ]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lora": {"r": 64}}}`` → ``{"training.lora.r": 64}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
