"""A job's record in the object store: the truth about what a job has done.

    jobs/<id>/spec.json                the validated spec, written once
    jobs/<id>/events/<ns>-<type>.json  one object per event (an append-only log)
    jobs/<id>/<stage>/...              a stage's outputs
    jobs/<id>/<stage>/manifest.json    written last: the stage is done
    models/<name>.json                 published models and where they live

The queue only rings the doorbell: a stage that finds its manifest does no work again.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from shared.errors import NotFound, SpecError
from shared.jobspec import JobSpec, parse_spec
from shared.messages import STAGES, Event, Message, Stage, dump_message, parse_message
from shared.store import Store


def new_job_id(name: str) -> str:
    """A sortable, unique job id that starts with the job's name."""
    return f"{name}-{datetime.now(UTC):%Y%m%d%H%M%S%f}-{secrets.token_hex(3)}"


_JOB_ID = re.compile(r"[a-zA-Z0-9_.-]{1,96}")


def job_prefix(job_id: str) -> str:
    """``jobs/<id>``; NotFound for an id no job can have (path tricks, control characters)."""
    if not _JOB_ID.fullmatch(job_id) or set(job_id) == {"."}:
        raise NotFound(f"no job {job_id!r}")
    return f"jobs/{job_id}"


#: every status a job can have, and those it ends in ("paused": a stage run in-process
#: finished and the next one waits for `termtune <stage> SPEC --job ID`)
JOB_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "rejected", "cancelled")
ENDED = ("succeeded", "failed", "rejected", "cancelled")

#: the event that records each stage's success
OUTCOMES = {
    "prepare": "DatasetPrepared",
    "train": "ModelTrained",
    "evaluate": "ModelEvaluated",
    "publish": "ModelPublished",
}


class JobRecords:
    """Reads and writes job records in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def spec_key(job_id: str) -> str:
        """Key of a job's spec."""
        return f"{job_prefix(job_id)}/spec.json"

    @staticmethod
    def stage_prefix(job_id: str, stage: Stage) -> str:
        """Prefix under which a stage writes its outputs."""
        return f"{job_prefix(job_id)}/{stage}"

    def manifest_key(self, job_id: str, stage: Stage) -> str:
        """Key of a stage's manifest."""
        return f"{self.stage_prefix(job_id, stage)}/manifest.json"

    def create(self, job_id: str, spec: JobSpec) -> str:
        """Store a new job's spec (once); returns the spec's URI."""
        key = self.spec_key(job_id)
        self.store.put_bytes_if_absent(key, spec.model_dump_json(indent=2).encode())
        return self.store.uri(key)

    def spec(self, job_id: str) -> JobSpec:
        """A job's spec; NotFound if there is no such job."""
        try:
            data = self.store.get_json(self.spec_key(job_id))
        except NotFound as exc:
            raise NotFound(f"no job {job_id!r}") from exc
        return parse_spec(data, source=self.store.uri(self.spec_key(job_id)))

    def exists(self, job_id: str) -> bool:
        """Whether a job was submitted."""
        return self.store.exists(self.spec_key(job_id))

    def job_ids(self) -> list[str]:
        """Every job id, newest first."""
        ids = {key.split("/")[1] for key in self.store.list("jobs") if key.endswith("/spec.json")}
        return sorted(ids, key=lambda i: (i.rsplit("-", 2)[-2:], i), reverse=True)

    def record(self, event: Event) -> None:
        """Append an event to its job's log."""
        name = f"{time.time_ns():020d}-{event.message_id[:12]}.json"
        key = f"{job_prefix(event.job_id)}/events/{name}"
        self.store.put_json(key, dump_message(event))

    def events(self, job_id: str) -> list[Message]:
        """A job's events, oldest first."""
        return [message for _, message in self.events_after(job_id)]

    def since_retry(self, job_id: str) -> list[Message]:
        """A job's events after the last user retry (all of them if none)."""
        events = self.events(job_id)
        last = max((n for n, e in enumerate(events) if e.type == "JobRetried"), default=-1)
        return events[last + 1 :]

    def outcome(self, job_id: str, stage: str) -> Message | None:
        """The stage's recorded success (since the last retry), if it has one."""
        kind = OUTCOMES[stage]
        return next((e for e in self.since_retry(job_id) if e.type == kind), None)

    def cancelled(self, job_id: str) -> bool:
        """Whether the job was recorded as cancelled (since the last retry)."""
        return any(e.type == "JobCancelled" for e in self.since_retry(job_id))

    def started(self, job_id: str, stage: str) -> bool:
        """Whether the stage was started (since the last retry)."""
        return any(e.type == "StageStarted" and e.stage == stage for e in self.since_retry(job_id))

    def deaths(self, job_id: str, stage: str) -> int:
        """Times ``stage`` was started and its worker vanished without an outcome.

        A start followed by another start, or the last start with no outcome when a new
        delivery arrives, is a worker that died (killed, out of memory, crashed) while on
        the command. A graceful interruption (shutdown, lost lease) records itself and does
        not count; a user's retry starts the count again.
        """
        deaths, open_start = 0, False
        for event in self.events(job_id):
            if event.type == "JobRetried":
                deaths, open_start = 0, False
            elif getattr(event, "stage", None) != stage:
                continue
            elif event.type == "StageStarted":
                deaths += open_start
                open_start = True
            elif event.type != "StageProgress" or event.progress.get("interrupted"):
                open_start = False
        return deaths + open_start

    def events_after(self, job_id: str, after: str = "") -> list[tuple[str, Message]]:
        """(id, event) of a job's events whose id sorts after ``after``, oldest first."""
        keys = self.store.list(f"{job_prefix(job_id)}/events")
        return [
            (key.rsplit("/", 1)[1], parse_message(self.store.get_json(key)))
            for key in keys
            if key.rsplit("/", 1)[1] > after
        ]

    def manifest(self, job_id: str, stage: Stage) -> dict[str, Any] | None:
        """A stage's manifest, or None while the stage is not done."""
        try:
            return self.store.get_json(self.manifest_key(job_id, stage))
        except NotFound:
            return None

    def write_manifest(self, job_id: str, stage: Stage, manifest: dict[str, Any]) -> str:
        """Write a stage's manifest (last, atomically); returns its URI."""
        key = self.manifest_key(job_id, stage)
        self.store.put_json(key, manifest)
        return self.store.uri(key)

    def summary(self, job_id: str) -> dict[str, Any]:
        """Status, stages and results of a job, derived from its events."""
        spec = self.spec(job_id)
        return summarize(job_id, spec, self.events(job_id))

    def request_cancel(self, job_id: str) -> bool:
        """Mark a job for cancellation; False if it was already marked."""
        return self.store.put_bytes_if_absent(f"{job_prefix(job_id)}/cancel", b"cancel requested\n")

    def clear_cancel(self, job_id: str) -> None:
        """Forget a cancel request (the job is being retried)."""
        self.store.delete(f"{job_prefix(job_id)}/cancel")

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a user asked to cancel the job."""
        return self.store.exists(f"{job_prefix(job_id)}/cancel")

    def check_model_name(self, name: str, *, overwrite: bool, job_id: str | None = None) -> None:
        """Refuse a name that another job's model holds, unless ``overwrite`` (SpecError)."""
        if overwrite:
            return
        try:
            entry = self.model(name)
        except NotFound:
            return
        if job_id is None or entry.get("job_id") != job_id:
            raise SpecError(
                f"field 'publish.model_name': a model named {name!r} is already published "
                f"by job {entry.get('job_id')} ({entry.get('location')}); set "
                "publish.overwrite: true to replace it, or choose another publish.model_name"
            )

    def register_model(self, name: str, entry: dict[str, Any], *, overwrite: bool = False) -> None:
        """Record a published model under its name. Without ``overwrite`` the first job to
        register a name keeps it: another job's entry is never replaced (SpecError)."""
        key = f"models/{name}.json"
        data = json.dumps(entry, indent=2, sort_keys=True, default=str).encode()
        if overwrite or not self.store.put_bytes_if_absent(key, data):
            self.check_model_name(name, overwrite=overwrite, job_id=entry.get("job_id"))
            self.store.put_bytes(key, data)  # a replacement, or this job's earlier attempt

    def model(self, name: str) -> dict[str, Any]:
        """A published model's entry; NotFound if none."""
        try:
            return self.store.get_json(f"models/{name}.json")
        except NotFound as exc:
            raise NotFound(f"no published model {name!r}") from exc

    def delete_model(self, name: str) -> None:
        """Forget a published model (its job's artifacts stay)."""
        self.store.delete(f"models/{name}.json")

    def models(self) -> list[dict[str, Any]]:
        """Every published model."""
        return [self.store.get_json(k) for k in self.store.list("models") if k.endswith(".json")]


def summarize(job_id: str, spec: JobSpec, events: list[Message]) -> dict[str, Any]:
    """Fold a job's events into its status and per-stage view."""
    stages: dict[str, dict[str, Any]] = {s: {"status": "pending"} for s in STAGES}
    job: dict[str, Any] = {
        "id": job_id,
        "name": spec.name,
        "status": "queued",
        "model_name": spec.model_name,
        "error": None,
        "result": {},
    }
    for event in events:
        data = dump_message(event)
        stage = data.get("stage")
        if event.type == "JobSubmitted":  # type: ignore[attr-defined]
            job["created_at"] = data["created_at"]
            continue
        if event.type == "CancelRequested":  # type: ignore[attr-defined]
            job["cancel_requested"] = True
            continue
        if event.type == "JobPaused":  # type: ignore[attr-defined]
            job.update(status="paused", next=data["next"])
            continue
        if event.type == "JobRetried":  # type: ignore[attr-defined]
            # The failure is history: stages from the resumed one on start over.
            for name in STAGES[STAGES.index(stage) :]:
                stages[name] = {"status": "pending"}
                job["result"].pop(name, None)
            job.update(status="queued", error=None, cancel_requested=False)
            job["retries"] = job.get("retries", 0) + 1
            continue
        view = stages[stage]
        kind = event.type  # type: ignore[attr-defined]
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
            view.update(
                status="succeeded", finished_at=data["created_at"], manifest=data["manifest"]
            )
            job["result"][stage] = {
                k: v
                for k, v in data.items()
                if k
                not in ("job_id", "schema_version", "message_id", "created_at", "type", "stage")
            }
            if kind == "ModelEvaluated" and not data["publish"]:
                job["status"] = "rejected"
                stages["publish"]["status"] = "skipped"
            if kind == "ModelPublished":
                job["status"] = "succeeded"
    job["stages"] = stages
    return job


def _skip_after(stages: dict[str, dict[str, Any]], stage: str) -> None:
    """The stages after one that ended the job will not run: they say so."""
    for name in STAGES[STAGES.index(stage) + 1 :]:
        if stages[name]["status"] == "pending":
            stages[name]["status"] = "skipped"
