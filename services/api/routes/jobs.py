"""/v1/jobs: submit, list (paged), inspect, cancel and retry a job; its events and report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, status
from fastapi.responses import HTMLResponse, StreamingResponse

from services.api.deps import BusDep, JobsDep
from shared.errors import NotFound, SpecError
from shared.jobs import ENDED, JOB_STATUSES, new_job_id
from shared.jobspec import parse_spec
from shared.messages import (
    STAGE_OF_COMMAND,
    STAGES,
    CancelRequested,
    JobCancelled,
    JobRetried,
    JobSubmitted,
    PrepareDataset,
    dump_message,
)
from shared.pipeline import resume_command

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_job(jobs: JobsDep, bus: BusDep, spec: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Validate a job spec, record the job and start its first stage."""
    try:
        parsed = parse_spec(spec, source="spec")
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    try:  # refused now rather than after training; the publisher checks again
        jobs.check_model_name(parsed.model_name, overwrite=parsed.publish.overwrite)
    except SpecError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    job_id = new_job_id(parsed.name)
    spec_uri = jobs.create(job_id, parsed)
    jobs.record(JobSubmitted(job_id=job_id, spec_uri=spec_uri, name=parsed.name))
    bus.publish(PrepareDataset(job_id=job_id, spec_uri=spec_uri))
    return jobs.summary(job_id)


@router.get("")
def list_jobs(
    jobs: JobsDep,
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(20, ge=1, le=200),
    after: str | None = Query(
        None, max_length=200, description="Id of the last job of the previous page."
    ),
) -> dict[str, Any]:
    """Jobs, newest first, optionally only those with a status; ``after`` pages on."""
    ids = jobs.job_ids()
    start = 0
    if after is not None:
        if after not in ids:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {after!r} to page after")
        start = ids.index(after) + 1
    found: list[dict[str, Any]] = []
    has_more = False
    for job_id in ids[start:]:
        summary = jobs.summary(job_id)
        if status_filter is not None and summary["status"] != status_filter:
            continue
        if len(found) == limit:
            has_more = True
            break
        found.append(summary)
    return {
        "data": found,
        "count": len(found),
        "has_more": has_more,
        "next_after": found[-1]["id"] if has_more else None,
    }


@router.get("/{job_id}")
def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """A job's status, stages, results and error."""
    return _or_404(lambda: jobs.summary(job_id))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Ask the job to stop; the running stage stops within one step (training: one
    optimizer step) and the job ends as cancelled."""
    summary = _or_404(lambda: jobs.summary(job_id))
    if summary["status"] in ENDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id!r} has already ended ({summary['status']})"
        )
    if jobs.request_cancel(job_id):
        jobs.record(CancelRequested(job_id=job_id))
    if summary["status"] in ("queued", "paused"):  # nothing runs it: cancelled now
        jobs.record(JobCancelled(job_id=job_id, stage=_next_stage(summary)))
    return jobs.summary(job_id)


def _next_stage(summary: dict[str, Any]) -> str:
    """The first stage of a job that has not succeeded."""
    return next(s for s in STAGES if summary["stages"][s]["status"] != "succeeded")


@router.post("/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED)
def retry_job(job_id: str, jobs: JobsDep, bus: BusDep) -> dict[str, Any]:
    """Resume a failed or cancelled job from the first stage it had not finished (training
    resumes from its latest checkpoint)."""
    summary = _or_404(lambda: jobs.summary(job_id))
    if summary["status"] not in ("failed", "cancelled"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id!r} is {summary['status']}; only failed or cancelled jobs are retried",
        )
    manifests = {
        stage: jobs.store.uri(jobs.manifest_key(job_id, stage))
        if jobs.manifest(job_id, stage) is not None
        else None
        for stage in STAGES
    }
    command = resume_command(job_id, jobs.store.uri(jobs.spec_key(job_id)), manifests)
    jobs.clear_cancel(job_id)
    jobs.record(JobRetried(job_id=job_id, stage=STAGE_OF_COMMAND[command.type]))
    bus.publish(command)
    return jobs.summary(job_id)


@router.get("/{job_id}/events", response_model=None)
def job_events(
    job_id: str,
    jobs: JobsDep,
    follow: bool = Query(False, description="Stream live as Server-Sent Events until the end."),
) -> dict[str, Any] | StreamingResponse:
    """A job's events, oldest first; with ``follow``, a live Server-Sent Events stream."""
    _or_404(lambda: jobs.spec(job_id))
    if not follow:
        return {"data": [dump_message(e) for e in jobs.events(job_id)]}
    return StreamingResponse(
        _stream(jobs, job_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _stream(jobs: Any, job_id: str, poll: float = 1.0) -> Iterator[str]:
    """SSE frames of every event, then of each new one, until the job has ended."""
    last = ""
    while True:
        ended = jobs.summary(job_id)["status"] in ENDED
        for event_id, event in jobs.events_after(job_id, last):
            last = event_id
            yield f"id: {event_id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
        if ended:
            yield "event: end\ndata: {}\n\n"
            return
        time.sleep(poll)


@router.get("/{job_id}/report")
def job_report(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """The evaluation report of a job."""
    _or_404(lambda: jobs.spec(job_id))
    report = jobs.manifest(job_id, "evaluate")
    if report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} has no report yet")
    return report


@router.get("/{job_id}/report.html", response_class=HTMLResponse)
def job_report_page(job_id: str, jobs: JobsDep) -> HTMLResponse:
    """The evaluation report as a self-contained page."""
    _or_404(lambda: jobs.spec(job_id))
    key = f"{jobs.stage_prefix(job_id, 'evaluate')}/report.html"
    page = _or_404(lambda: jobs.store.get_bytes(key))
    return HTMLResponse(page.decode())


def _or_404(fn: Any) -> Any:
    try:
        return fn()
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
