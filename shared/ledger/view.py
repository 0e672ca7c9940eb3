"""A job's view (status, stages, results, error), folded one event at a time.

The ledger applies each event to the stored view in the transaction that appends it, so a
job's status is always the fold of its events and never needs them read again.
"""

from __future__ import annotations

import copy
from typing import Any

from shared.messages import ENDED, JOB_STATUSES, STAGES

__all__ = ["ENDED", "JOB_STATUSES", "current_stage", "fold", "new_view", "user_retry"]
_ENVELOPE = ("job_id", "schema_version", "message_id", "created_at", "type", "stage")


def new_view(job_id: str, name: str, model_name: str, created_at: str) -> dict[str, Any]:
    """The view of a job no event has touched yet."""
    return {
        "id": job_id,
        "name": name,
        "status": "queued",
        "model_name": model_name,
        "created_at": created_at,
        "error": None,
        "result": {},
        "stages": {s: {"status": "pending"} for s in STAGES},
    }


def fold(view: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The view after one event (``data``: the event as dumped); ``view`` is not changed."""
    job = copy.deepcopy(view)
    kind, stage = data["type"], data.get("stage")
    stages = job["stages"]
    if kind == "JobSubmitted":
        job["created_at"] = data["created_at"]
    elif kind == "CancelRequested":
        job["cancel_requested"] = True
    elif kind == "JobPaused":
        job.update(status="paused", next=data["next"])
    elif kind == "JobRetried":
        # The failure is history: stages from the resumed one on start over.
        for name in STAGES[STAGES.index(stage) :]:
            stages[name] = {"status": "pending"}
            job["result"].pop(name, None)
        job.update(status="queued", error=None)
        if user_retry(data):  # only a user's retry withdraws a user's cancel
            job["cancel_requested"] = False
        job["retries"] = job.get("retries", 0) + 1
    else:
        _fold_stage(job, stages, kind, stage, data)
    return job


def _fold_stage(
    job: dict[str, Any], stages: dict[str, Any], kind: str, stage: str, data: dict[str, Any]
) -> None:
    view = stages[stage]
    if kind == "StageStarted":
        view.update(
            status="running",
            started_at=data["created_at"],
            attempt=data["attempt"],
            worker=data["worker"],
        )
        if job["status"] in ("queued", "paused"):
            job["status"] = "running"
            job.pop("next", None)
    elif kind == "StageProgress":
        view["progress"] = data["progress"]
    elif kind == "JobCancelled":
        view.update(status="cancelled", finished_at=data["created_at"])
        job["status"] = "cancelled"
        _skip_after(stages, stage)
    elif kind == "StageFailed":
        view.update(status="failed", finished_at=data["created_at"], error=data["error"])
        job.update(
            status="failed",
            error={"stage": stage, "reason": data["error"], "type": data["error_type"]},
        )
        _skip_after(stages, stage)
    else:
        view.update(status="succeeded", finished_at=data["created_at"], manifest=data["manifest"])
        job["result"][stage] = {k: v for k, v in data.items() if k not in _ENVELOPE}
        if kind == "ModelEvaluated" and not data["publish"]:
            job["status"] = "rejected"
            stages["publish"]["status"] = "skipped"
        if kind == "ModelPublished":
            job["status"] = "succeeded"


def _skip_after(stages: dict[str, dict[str, Any]], stage: str) -> None:
    """The stages after one that ended the job will not run: they say so."""
    for name in STAGES[STAGES.index(stage) + 1 :]:
        if stages[name]["status"] == "pending":
            stages[name]["status"] = "skipped"


def user_retry(data: dict[str, Any]) -> bool:
    """Whether a dumped ``JobRetried`` is a user's retry, not termtune's own redo of a stage
    whose output was found corrupt (which gives its ``reason``)."""
    return data.get("reason") is None


def current_stage(view: dict[str, Any]) -> str | None:
    """The stage the job is at: the last one that is not pending or skipped."""
    moved = [s for s in STAGES if view["stages"][s]["status"] not in ("pending", "skipped")]
    return moved[-1] if moved else None
