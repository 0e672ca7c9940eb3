"""Running one stage: the context a handler gets, and recording what the handler did.

No broker here: handlers and in-process stage runs import this module, never kombu; the
worker loop (shared.worker) wires it to the bus.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import tracking, worker_metrics
from shared.errors import (
    Cancelled,
    CorruptOutput,
    Interrupted,
    LedgerUnavailable,
    NotFound,
    PermanentError,
)
from shared.jobs import JobRecords, read_manifest
from shared.jobspec import JobSpec, parse_spec
from shared.messages import (
    STAGE_OF_COMMAND,
    Command,
    Event,
    JobCancelled,
    JobRetried,
    StageFailed,
    StageProgress,
    StageStarted,
)
from shared.pipeline import next_command
from shared.settings import Settings
from shared.store import Store

log = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 2.0
CANCEL_CHECK_SECONDS = 1.0


@dataclass
class StageContext:
    """What a handler may use: the store, the job records, settings and a progress hook."""

    store: Store
    jobs: JobRecords
    settings: Settings
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    progress: Callable[..., None] = field(default=lambda progress, *, force=False: None)
    stop: threading.Event = field(default_factory=threading.Event)

    lease_lost: threading.Event = field(default_factory=threading.Event)
    #: the scratch folders the running stage made, removed when it ends (``run_stage``)
    scratched: list[_Scratch] = field(default_factory=list)

    def should_stop(self, command: Command) -> str | None:
        """Why the running stage must stop now: "lost" (lease), "cancel", "shutdown", or None."""
        if self.lease_lost.is_set():
            return "lost"
        if self.jobs.cancel_requested(command.job_id):
            return "cancel"
        return "shutdown" if self.stop.is_set() else None

    def local_stop(self) -> str | None:
        """``should_stop`` without asking the database (no cancel): cheap enough for every
        step of a loop that asks the database on a timer."""
        if self.lease_lost.is_set():
            return "lost"
        return "shutdown" if self.stop.is_set() else None

    def spec(self, command: Command) -> JobSpec:
        """The job spec a command points at."""
        data = self.store.get_json(self.store.key_of(command.spec_uri))
        return parse_spec(data, source=command.spec_uri)

    def manifest_at(self, uri: str) -> dict[str, Any]:
        """An earlier stage's manifest by its URI; CorruptOutput naming that stage when it
        is gone or unreadable."""
        key = self.store.key_of(uri)
        stage = key.rsplit("/", 2)[-2]
        try:
            return read_manifest(self.store, key)
        except (NotFound, ValueError) as exc:
            why = "it is gone" if isinstance(exc, NotFound) else str(exc)
            raise CorruptOutput(f"the {stage} stage's manifest {uri}: {why}", stage=stage) from exc

    def scratch(self, command: Command, name: str) -> Path:
        """An empty local working folder for one stage of one job, this worker's alone (two
        workers sharing a cache may hold one stage in turn, the first still finishing as the
        next begins), removed with what it holds when the stage ends, however it ends (a
        tokenized copy of the dataset, a merged model: gigabytes a failed job would
        otherwise leave on the worker's disk). The folder's lock (``_Scratch``) is held while
        it is in use; what a process that has ended left there is removed first."""
        parent = self.settings.cache_dir / "scratch" / command.job_id / name
        _sweep(parent)
        held = _Scratch.make(parent / f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        self.scratched.append(held)
        return held.folder

    def drop_scratch(self) -> None:
        """Remove the scratch folders the stage made (and their job's, once empty)."""
        while self.scratched:
            self.scratched.pop().remove()

    def tracked_run(
        self, command: Command, training: dict[str, Any], stage: str
    ) -> tracking.TrackedRun | None:
        """The job's experiment-tracking run the trainer opened (None: not tracked)."""
        ref = training.get("tracking")
        if not ref:
            return None
        folder = self.scratch(command, "tracking")
        return tracking.attach(ref, self.settings, store=self.store, folder=folder, stage=stage)


Handler = Callable[[Command, StageContext], Event]
_HOST = socket.gethostname().replace("/", "_")
#: the file in a scratch folder whose lock its user holds (released when the process ends,
#: however it ends, in any PID namespace sharing the disk)
_LOCK = ".in-use"


@dataclass
class _Scratch:
    """A scratch folder and the open lock file that says it is in use."""

    folder: Path
    lock: Any

    @classmethod
    def make(cls, folder: Path) -> _Scratch:
        folder.mkdir(parents=True)
        lock = (folder / _LOCK).open("w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(folder, lock)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock.close()
        for empty in (self.folder.parent, self.folder.parent.parent):
            with contextlib.suppress(OSError):  # another worker may still use it
                empty.rmdir()


def _sweep(parent: Path) -> None:
    """Remove the scratch folders in ``parent`` no process uses: their lock is free (a
    worker killed mid-stage left them). A folder being made (no lock file yet) is left."""
    if not parent.is_dir():
        return
    for folder in parent.iterdir():
        try:
            with (folder / _LOCK).open("r+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # held (BlockingIOError), or no lock file
            continue


class _Progress:
    """Records progress events for one stage, at most one every few seconds; every report is
    also a stopping point for a stage other than training (which stops at an optimizer step,
    checkpointed): once the worker is asked to stop (SIGTERM) it raises Interrupted (the
    command goes back to the queue), once its lease is lost Interrupted too (the worker that
    holds it now runs the stage), once the job is cancelled (looked up at most once a
    second) Cancelled."""

    def __init__(
        self,
        jobs: JobRecords,
        command: Command,
        stop: threading.Event | None = None,
        lease_lost: threading.Event | None = None,
    ) -> None:
        self.jobs, self.command, self.last, self.checked = jobs, command, 0.0, 0.0
        self.stop = stop or threading.Event()
        self.lease_lost = lease_lost or threading.Event()
        self.stage = STAGE_OF_COMMAND[command.type]  # type: ignore[attr-defined]

    def __call__(self, progress: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        worker_metrics.observe_progress(self.stage, progress)
        if self.stage != "train" and self.lease_lost.is_set():
            raise Interrupted(f"{self.stage} stopped: its lease was lost")
        if self.stage != "train" and self.stop.is_set():
            raise Interrupted(f"{self.stage} stopped: the worker is shutting down")
        if self.stage != "train" and now - self.checked >= CANCEL_CHECK_SECONDS:
            self.checked = now
            if self._cancelled():
                raise Cancelled(f"job {self.command.job_id} was cancelled")
        if force or now - self.last >= PROGRESS_EVERY_SECONDS:
            self.last = now
            try:
                self.jobs.record(
                    StageProgress(job_id=self.command.job_id, stage=self.stage, progress=progress),
                    patient=False,
                )
            except LedgerUnavailable as exc:  # the next report replaces it
                log.warning("progress not recorded: %s", exc)

    def _cancelled(self) -> bool:
        try:
            return self.jobs.cancel_requested(self.command.job_id)
        except LedgerUnavailable:
            return False  # looked up again at the next report


def run_stage(
    command: Command,
    handler: Handler,
    ctx: StageContext,
    *,
    attempt: int = 1,
    final_attempt: bool = True,
    dispatch: bool = False,
) -> Event | None:
    """Run one stage and record its outcome; returns the event, None if it should be retried.

    A PermanentError, or any error on the final attempt, records StageFailed and returns it.
    With ``dispatch``, the event and the command that follows it go to the outbox in the
    transaction that records the event.
    """
    stage = STAGE_OF_COMMAND[command.type]  # type: ignore[attr-defined]
    jobs = ctx.jobs
    if jobs.cancel_requested(command.job_id) and jobs.cancelled(command.job_id):
        return JobCancelled(job_id=command.job_id, stage=stage)  # recorded when cancelled
    jobs.record(
        StageStarted(job_id=command.job_id, stage=stage, worker=ctx.worker, attempt=attempt)
    )
    ctx.progress = _Progress(jobs, command, ctx.stop, ctx.lease_lost)
    ctx.scratched = []
    try:
        return _run_handler(command, handler, ctx, attempt, final_attempt, dispatch)
    finally:
        ctx.drop_scratch()


def _run_handler(
    command: Command,
    handler: Handler,
    ctx: StageContext,
    attempt: int,
    final_attempt: bool,
    dispatch: bool,
) -> Event | None:
    """``run_stage`` once the stage has started: the handler, and its outcome recorded."""
    stage = STAGE_OF_COMMAND[command.type]  # type: ignore[attr-defined]
    jobs = ctx.jobs
    try:
        if jobs.cancel_requested(command.job_id):
            raise Cancelled(f"job {command.job_id} was cancelled")
        event = handler(command, ctx)
    except Cancelled:
        cancelled = JobCancelled(job_id=command.job_id, stage=stage)
        jobs.record(cancelled, send=[cancelled] if dispatch else [])
        end_run(ctx, command, "KILLED")
        return cancelled
    except Interrupted:
        raise  # not a failure: the worker requeues the command
    except CorruptOutput as exc:
        return _redo(command, ctx, exc, dispatch)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then decided
        permanent = isinstance(exc, PermanentError)
        log.error(
            "%s %s attempt %d failed: %s",
            stage,
            command.job_id,
            attempt,
            exc,
            exc_info=not permanent,
        )
        if not (permanent or final_attempt):
            return None
        return _failed(command, ctx, exc, attempt, dispatch)
    jobs.record(event, send=[event, next_command(command, event)] if dispatch else [])
    return event


def _failed(
    command: Command, ctx: StageContext, exc: Exception, attempt: int, dispatch: bool
) -> StageFailed:
    """Record the stage's failure (the job's, from here)."""
    failed = StageFailed(
        job_id=command.job_id,
        stage=STAGE_OF_COMMAND[command.type],  # type: ignore[attr-defined]
        error=str(exc) or repr(exc),
        error_type=type(exc).__name__,
        attempts=attempt,
        permanent=isinstance(exc, PermanentError),
    )
    ctx.jobs.record(failed, send=[failed] if dispatch else [])
    end_run(ctx, command, "FAILED")
    return failed


def _redo(command: Command, ctx: StageContext, exc: CorruptOutput, dispatch: bool) -> Event:
    """The stage that wrote a corrupt output is made to run again: its manifest set aside
    and the cached copies of its outputs dropped, then (dispatched, once a job and stage)
    its command sent with a ``JobRetried`` that says why. Otherwise the job fails, and a
    retry starts at that stage."""
    jobs, job_id, stage = ctx.jobs, command.job_id, exc.stage
    retries = [e for _, e in jobs.events_after(job_id) if isinstance(e, JobRetried)]
    redone = [e for e in retries if e.reason is not None]  # termtune's own, not a user's
    kept = jobs.set_aside(job_id, stage, str(exc))  # type: ignore[arg-type]
    where = f"; its manifest kept as {jobs.store.uri(kept)}" if kept else ""
    prefix = jobs.stage_prefix(job_id, stage)  # type: ignore[arg-type]
    shutil.rmtree(ctx.settings.cache_dir / "artifacts" / prefix, ignore_errors=True)
    if any(e.stage == stage for e in redone) or not dispatch:
        again = "found corrupt before: not redone again" if redone else "set aside"
        exc.args = (f"{exc} (the {stage} stage's output {again}{where}; a retry runs it again)",)
        return _failed(command, ctx, exc, 1, dispatch)
    resumed = jobs.resume_command(job_id)
    retried = JobRetried(
        job_id=job_id,
        stage=STAGE_OF_COMMAND[resumed.type],  # type: ignore[attr-defined]
        reason=f"{exc}{where}",
    )
    log.warning("%s: %s; the %s stage runs again", job_id, exc, retried.stage)
    jobs.record(retried, send=[resumed])
    return retried


def end_run(ctx: StageContext, command: Command, status: str) -> None:
    """The job ended in this stage: its experiment-tracking run (opened by the trainer)
    ends with it."""
    if STAGE_OF_COMMAND[command.type] == "prepare":  # type: ignore[attr-defined]
        return
    try:
        spec = ctx.spec(command)
    except Exception:  # noqa: BLE001 - an unreadable spec is the stage's own failure
        return
    tracking.end_quietly(command.job_id, spec, ctx.settings, status)
