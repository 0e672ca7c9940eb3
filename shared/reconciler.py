"""Re-sending the commands of jobs whose worker stopped renewing its lease."""

from __future__ import annotations

import logging

from shared import tracking
from shared.bus import ATTEMPT_HEADER
from shared.jobs import JobRecords
from shared.leases import ExpiredLease, delete_lease, expired_leases, mark_redispatched
from shared.messages import StageFailed, StageProgress, parse_message
from shared.periodic import Periodic
from shared.settings import Settings

log = logging.getLogger(__name__)


def reconcile_once(jobs: JobRecords, *, settings: Settings | None = None) -> list[str]:
    """Re-dispatch each stage whose lease expired before the stage finished; the job ids.

    The lease is marked, the event recorded and the command written to the outbox in one
    transaction: two replicas never both re-send it, and a crash re-sends it or nothing. A
    lease that cannot be handled (its command unreadable) is quarantined and its job failed
    with the reason; the others are reconciled all the same. ``settings`` name the tracking
    server of the runs it ends (default: read from the environment).
    """
    sent = []
    for lease in expired_leases(jobs.ledger):
        try:
            if _reconcile(jobs, lease, settings):
                sent.append(lease.job_id)
        except Exception as exc:  # noqa: BLE001 - one bad record never stops the others
            log.error("lease of %s %s not reconciled: %s", lease.job_id, lease.stage, exc)
            _quarantine(jobs, lease, exc)
    if sent:
        jobs.outbox_written()
    return sent


def _reconcile(jobs: JobRecords, lease: ExpiredLease, settings: Settings | None) -> bool:
    """Re-send one expired lease's command (True), or drop the lease of a stage that ended
    (its success recorded), of a job that failed or of a job being cancelled. A stage whose
    manifest is stored but whose success is not (its worker died in between) is sent again:
    the handler finds the manifest, does no work twice and records the success. A worker
    that died after recording the job's failure leaves it failed: only a retry runs it. A
    job being cancelled whose worker died is recorded as cancelled, as that worker would
    have done, in the transaction that drops the lease, and its tracking run ended KILLED."""
    job_id = lease.job_id
    ended = jobs.finished(job_id, lease.stage) or jobs.failure(job_id) is not None
    cancelling = not ended and jobs.cancel_requested(job_id)
    if ended or cancelling:
        with jobs.ledger.write() as conn:
            # the stage ended, or was to stop: the lease is stale
            cancelled = (
                delete_lease(conn, lease)
                and cancelling
                and jobs.cancel_abandoned(conn, job_id, lease.stage)
            )
        if cancelled:
            jobs.outbox_written()
            log.warning("%s: its worker was lost while it was being cancelled: cancelled", job_id)
            _end_run(jobs, job_id, lease.stage, settings)
        return False
    with jobs.ledger.write() as conn:
        command = parse_message(lease.command["body"])
        attempt = int(lease.command["attempt"]) + 1
        if not mark_redispatched(conn, lease, jobs.ledger):
            return False  # renewed, taken or re-sent by another replica meanwhile
        progress = StageProgress(
            job_id=lease.job_id,
            stage=lease.stage,
            progress={"phase": "worker lost (lease expired); job sent again", "attempt": attempt},
        )
        jobs.append(conn, progress, send=[(command, {ATTEMPT_HEADER: attempt})])
    log.warning("re-dispatched %s %s (attempt %d)", lease.job_id, lease.stage, attempt)
    return True


def _end_run(jobs: JobRecords, job_id: str, stage: str, settings: Settings | None) -> None:
    """The job was cancelled in ``stage`` for its lost worker: its experiment-tracking run
    (opened by the trainer) ends KILLED, as that worker's would have (shared.stage.end_run).
    Never raises: the cancellation is recorded whatever the tracking server does."""
    if stage == "prepare":
        return  # no run is opened before training
    try:
        tracking.end_quietly(job_id, jobs.spec(job_id), settings or Settings(), "KILLED")
    except Exception as exc:  # noqa: BLE001 - an unreadable spec leaves the run as it is
        log.warning("%s: its tracking run not ended: %s", job_id, exc)


def _quarantine(jobs: JobRecords, lease: ExpiredLease, exc: Exception) -> None:
    """Set a lease aside (never looked at again) and fail its job, saying why."""
    try:
        with jobs.ledger.write() as conn:
            if mark_redispatched(conn, lease, jobs.ledger):
                failed = StageFailed(
                    job_id=lease.job_id,
                    stage=lease.stage,
                    error=f"its worker was lost and the command it held cannot be read "
                    f"({type(exc).__name__}); retry the job to start the stage again",
                    error_type="CorruptRecord",
                    permanent=True,
                )
                jobs.append(conn, failed)
    except Exception as again:  # noqa: BLE001 - reported; the next pass tries again
        log.error("lease of %s %s not quarantined: %s", lease.job_id, lease.stage, again)


class Reconciler(Periodic):
    """Runs reconcile_once every few seconds in a background thread."""

    def __init__(self, jobs: JobRecords, *, every: float, settings: Settings | None = None) -> None:
        super().__init__("reconciler", every, lambda: reconcile_once(jobs, settings=settings))
