"""Re-sending the commands of jobs whose worker stopped renewing its lease."""

from __future__ import annotations

import logging
import threading

from shared.bus import ATTEMPT_HEADER, Bus
from shared.jobs import JobRecords
from shared.leases import expired_leases, mark_redispatched
from shared.messages import StageProgress, parse_message

log = logging.getLogger(__name__)


def reconcile_once(jobs: JobRecords, bus: Bus) -> list[str]:
    """Re-dispatch each stage whose lease expired before the stage finished; the job ids."""
    sent = []
    for key, doc in expired_leases(jobs.store):
        _, job_id, stage, _ = key.split("/", 3)
        if jobs.store.exists(f"jobs/{job_id}/{stage}/manifest.json") or jobs.cancel_requested(
            job_id
        ):
            jobs.store.delete(key)  # the stage ended; the lease is stale
            continue
        if not mark_redispatched(jobs.store, key, doc):
            continue  # renewed, taken or re-sent by another replica meanwhile
        command = parse_message(doc["command"]["body"])
        attempt = int(doc["command"]["attempt"]) + 1
        bus.publish(command, headers={ATTEMPT_HEADER: attempt})
        jobs.record(
            StageProgress(
                job_id=job_id,
                stage=stage,
                progress={
                    "phase": "worker lost (lease expired); job sent again",
                    "attempt": attempt,
                },
            )
        )
        log.warning("re-dispatched %s %s (attempt %d)", job_id, stage, attempt)
        sent.append(job_id)
    return sent


class Reconciler:
    """Runs reconcile_once every few seconds in a background thread."""

    def __init__(self, jobs: JobRecords, bus: Bus, *, every: float) -> None:
        self.jobs, self.bus, self.every = jobs, bus, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="reconciler")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                reconcile_once(self.jobs, self.bus)
            except Exception as exc:  # noqa: BLE001 - keep reconciling after a hiccup
                log.error("reconcile failed: %s", exc)

    def start(self) -> None:
        """Begin reconciling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reconciling."""
        self._stop.set()
        self._thread.join(timeout=5)
