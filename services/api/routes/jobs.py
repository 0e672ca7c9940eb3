"""/v1/jobs: submit, list, inspect a job and read its events and report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, status
from fastapi.responses import HTMLResponse, StreamingResponse

from services.api.deps import BusDep, JobsDep
from shared.errors import NotFound, SpecError
from shared.jobs import new_job_id
from shared.jobspec import parse_spec
from shared.messages import CancelRequested, JobSubmitted, PrepareDataset, dump_message

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobStatus = Literal["queued", "running", "succeeded", "failed", "rejected", "cancelled"]
ENDED = ("succeeded", "failed", "rejected", "cancelled")


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_job(jobs: JobsDep, bus: BusDep, spec: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Validate a job spec, record the job and start its first stage."""
    try:
        parsed = parse_spec(spec, source="spec")
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
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
) -> dict[str, Any]:
    """Jobs, newest first, optionally only those with a status."""
    found = []
    for job_id in jobs.job_ids():
        summary = jobs.summary(job_id)
        if status_filter is None or summary["status"] == status_filter:
            found.append(summary)
        if len(found) >= limit:
            break
    return {"data": found, "count": len(found)}


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
