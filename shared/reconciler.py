"""Re-sending the commands of jobs whose worker stopped renewing its lease."""

from __future__ import annotations

import logging

from shared.bus import ATTEMPT_HEADER
from shared.jobs import JobRecords
from shared.leases import delete_lease, expired_leases, mark_redispatched
from shared.messages import StageProgress, parse_message
from shared.periodic import Periodic

log = logging.getLogger(__name__)


def reconcile_once(jobs: JobRecords) -> list[str]:
    """Re-dispatch each stage whose lease expired before the stage finished; the job ids.

    The lease is marked, the event recorded and the command written to the outbox in one
    transaction: two replicas never both re-send it, and a crash re-sends it or nothing.
    """
    sent = []
    for lease in expired_leases(jobs.ledger):
        stale = jobs.store.exists(
            jobs.manifest_key(lease.job_id, lease.stage)  # type: ignore[arg-type]
        ) or jobs.cancel_requested(lease.job_id)
        with jobs.ledger.write() as conn:
            if stale:
                delete_lease(conn, lease)  # the stage ended; the lease is stale
                continue
            if not mark_redispatched(conn, lease, jobs.ledger):
                continue  # renewed, taken or re-sent by another replica meanwhile
            command = parse_message(lease.command["body"])
            attempt = int(lease.command["attempt"]) + 1
            progress = StageProgress(
                job_id=lease.job_id,
                stage=lease.stage,
                progress={
                    "phase": "worker lost (lease expired); job sent again",
                    "attempt": attempt,
                },
            )
            jobs.append(conn, progress, send=[(command, {ATTEMPT_HEADER: attempt})])
        log.warning("re-dispatched %s %s (attempt %d)", lease.job_id, lease.stage, attempt)
        sent.append(lease.job_id)
    if sent:
        jobs.outbox_written()
    return sent


class Reconciler(Periodic):
    """Runs reconcile_once every few seconds in a background thread."""

    def __init__(self, jobs: JobRecords, *, every: float) -> None:
        super().__init__("reconciler", every, lambda: reconcile_once(jobs))
