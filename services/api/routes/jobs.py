"""/v1/jobs: submit, list (paged), inspect, cancel and retry a job; its events and report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    Body,
    Depends,
    Header,
    HTTPException,
    Query,
    status,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from services.api.deps import JobsDep, SettingsDep
from services.api.routing import UniqueKeysRoute
from shared import families, tracking
from shared.api_models import (
    EvaluationReport,
    EventPage,
    EventView,
    JobPage,
    JobStatus,
    JobView,
)
from shared.basemodel import base_model_family
from shared.errors import Conflict, ModelError, NotFound, SpecError, StoreLocationError
from shared.jobs import ENDED, RETRYABLE, new_job_id
from shared.jobspec import parse_spec
from shared.locations import check_source
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

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=UniqueKeysRoute)
#: the largest event number a client may page from: events.seq is a 32-bit integer on
#: PostgreSQL, and a bigger bound parameter fails there (and past 64 bits on SQLite)
MAX_SEQ = 2**31 - 1


@router.post("", status_code=status.HTTP_201_CREATED, response_model_exclude_unset=True)
def submit_job(jobs: JobsDep, settings: SettingsDep, spec: dict[str, Any] = Body(...)) -> JobView:
    """Validate a job spec, record the job and (through the outbox) start its first stage."""
    try:
        parsed = parse_spec(spec, source="spec")
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    try:  # refused now rather than after data-prep starts; the stages check again
        check_source(parsed.dataset.source, store_root=jobs.store.root_uri, settings=settings)
        # an upload must be finished; a model whose config is at hand, of a family Bedrock
        # imports, trained in the format it answers in
        family = base_model_family(
            parsed.base_model, store=jobs.store, cache_dir=settings.cache_dir
        )
        if family is not None:
            families.check_prompting(
                family, parsed.dataset.chat_template, where=f"base_model {parsed.base_model!r}"
            )
        parsed = tracking.resolve(parsed, settings)  # the deployment's default, fixed now
    except (StoreLocationError, SpecError, ModelError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    job_id = new_job_id(parsed.name)
    spec_uri = jobs.store.uri(jobs.spec_key(job_id))
    try:  # refused now rather than after training; the publisher claims the name again
        jobs.check_model_name(parsed.model_name, overwrite=parsed.publish.overwrite)
        jobs.create(
            job_id,
            parsed,
            submitted=JobSubmitted(job_id=job_id, spec_uri=spec_uri, name=parsed.name),
            send=[PrepareDataset(job_id=job_id, spec_uri=spec_uri)],
            own_name=not parsed.publish.overwrite,
        )
    except SpecError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return JobView.model_validate(jobs.summary(job_id))


@router.get("", response_model_exclude_unset=True)
def list_jobs(
    jobs: JobsDep,
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(20, ge=1, le=200),
    after: str | None = Query(
        None, max_length=200, description="Id of the last job of the previous page."
    ),
) -> JobPage:
    """Jobs, newest first, optionally only those with a status; ``after`` pages on."""
    views, has_more = _or_404(lambda: jobs.page(status=status_filter, limit=limit, after=after))
    data = [JobView.model_validate(v) for v in views]
    return JobPage(
        data=data,
        count=len(data),
        has_more=has_more,
        next_after=data[-1].id if has_more else None,
    )


@router.get("/{job_id}", response_model_exclude_unset=True)
def get_job(job_id: str, jobs: JobsDep) -> JobView:
    """A job's status, stages, results and error."""
    return JobView.model_validate(_or_404(lambda: jobs.summary(job_id)))


@router.post(
    "/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model_exclude_unset=True
)
def cancel_job(
    job_id: str, jobs: JobsDep, settings: SettingsDep, background: BackgroundTasks
) -> JobView:
    """Ask the job to stop; the running stage stops within one step (training: one
    optimizer step) and the job ends as cancelled; a queued or paused job ends now (its
    MLflow run, if training opened one, ends KILLED after the answer)."""
    summary = _or_404(lambda: jobs.summary(job_id))
    try:
        view = jobs.cancel(
            job_id,
            requested=CancelRequested(job_id=job_id),
            cancelled=JobCancelled(job_id=job_id, stage=_next_stage(summary)),
        )
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    if view["status"] == "cancelled":  # between stages: no worker will end its run
        background.add_task(tracking.end_quietly, job_id, jobs.spec(job_id), settings, "KILLED")
    return JobView.model_validate(view)


def _next_stage(summary: dict[str, Any]) -> str:
    """The first stage of a job that has not succeeded."""
    return next((s for s in STAGES if summary["stages"][s]["status"] != "succeeded"), STAGES[-1])


@router.post(
    "/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model_exclude_unset=True
)
def retry_job(job_id: str, jobs: JobsDep) -> JobView:
    """Resume a failed or cancelled job from the first stage it had not finished (training
    resumes from its latest checkpoint)."""
    summary = _or_404(lambda: jobs.summary(job_id))
    if summary["status"] not in RETRYABLE:  # asked again, under the job's lock, below
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id!r} is {summary['status']}; only failed or cancelled jobs are retried",
        )
    command = jobs.resume_command(job_id)
    retried = JobRetried(job_id=job_id, stage=STAGE_OF_COMMAND[command.type])
    try:
        view = jobs.retry(job_id, retried=retried, send=[command])
    except Conflict as exc:  # another retry (or a change) came first
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return JobView.model_validate(view)


@router.get("/{job_id}/events")
def job_events(
    job_id: str,
    jobs: JobsDep,
    after: int = Query(0, ge=0, le=MAX_SEQ, description="Only events after this sequence number."),
    limit: int = Query(10_000, ge=1, le=10_000),
) -> EventPage:
    """A job's events, oldest first, numbered 1, 2, 3... (``after`` pages on)."""
    _or_404(lambda: jobs.summary(job_id))
    found = jobs.events_after(job_id, after, limit=limit + 1)
    data = [EventView(seq=seq, **dump_message(e)) for seq, e in found[:limit]]
    return EventPage(
        data=data, last_seq=data[-1].seq if data else after, has_more=len(found) > limit
    )


def _existing_job(job_id: str, jobs: JobsDep) -> str:
    """The path's job id, once the job is known to exist (404 before any stream starts)."""
    _or_404(lambda: jobs.summary(job_id))
    return job_id


@router.get("/{job_id}/events/stream", response_class=EventSourceResponse)
async def job_event_stream(
    job_id: Annotated[str, Depends(_existing_job)],
    jobs: JobsDep,
    last_event_id: int | None = Header(
        None,
        ge=0,
        le=MAX_SEQ,
        description="Resume after this event (sent by browsers on reconnect).",
    ),
    after: int = Query(0, ge=0, le=MAX_SEQ, description="Start after this sequence number."),
    poll: float = Query(1.0, ge=0.1, le=10.0, description="Seconds between looks for new events."),
) -> AsyncIterator[ServerSentEvent]:
    """A job's events live as Server-Sent Events (``id`` = sequence number), then an
    ``end`` event once the job has ended."""
    after = last_event_id if last_event_id is not None else after
    while True:
        ended = (await run_in_threadpool(jobs.summary, job_id))["status"] in ENDED
        for seq, event in await run_in_threadpool(jobs.events_after, job_id, after):
            after = seq
            yield ServerSentEvent(raw_data=event.model_dump_json(), event=event.type, id=str(seq))  # type: ignore[attr-defined]
        if ended:
            yield ServerSentEvent(raw_data="{}", event="end")
            return
        await asyncio.sleep(poll)


@router.get("/{job_id}/report")
def job_report(job_id: str, jobs: JobsDep) -> EvaluationReport:
    """The evaluation report of a job."""
    _or_404(lambda: jobs.summary(job_id))
    report = jobs.manifest(job_id, "evaluate")
    if report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} has no report yet")
    return EvaluationReport.model_validate(report)


@router.get("/{job_id}/report.html", response_class=HTMLResponse)
def job_report_page(job_id: str, jobs: JobsDep) -> HTMLResponse:
    """The evaluation report as a self-contained page."""
    _or_404(lambda: jobs.summary(job_id))
    key = f"{jobs.stage_prefix(job_id, 'evaluate')}/report.html"
    page = _or_404(lambda: jobs.store.get_bytes(key))
    return HTMLResponse(page.decode())


def _or_404(fn: Any) -> Any:
    try:
        return fn()
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
