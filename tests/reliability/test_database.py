"""The job database (PostgreSQL, Debian's server) crashing and coming back with jobs in
flight, under the whole embedded deployment (every service a process)."""

from __future__ import annotations

import time

import pytest

from services.cli.display import TERMINAL
from shared.jobs import OUTCOMES
from tests.e2e.test_trainer_shutdown import _running
from tests.factories import FAST_LEASE, lease_settings, spec_dict

pytestmark = pytest.mark.e2e
FAST = FAST_LEASE
DOWN_SECONDS = 5.0


def _job(client, job_id):
    """The job, or None while the API answers 503 (the database is down)."""
    from services.cli.client import ApiError

    try:
        return client.job(job_id)
    except ApiError:
        return None


def test_database_restart_with_jobs_in_flight(scenario, postgres, tmp_path, tiny_model):
    outcome = scenario(
        "restart the database with jobs in flight",
        full=8,
        ci=3,
        must_hold="every job succeeds; each stage's outcome recorded once; events numbered "
        "without gaps; the API answers 503 while down, never a half-recorded job",
        settings=lease_settings(FAST),
    )
    url = postgres.fresh_database()
    env = {**FAST, "TERMTUNE_DATABASE_URL": url}
    with _running(tmp_path, env=env) as (launcher, client):
        ids = [
            client.submit(spec_dict(tiny_model, name=f"dbr-{n}", training={"max_steps": 40}))["id"]
            for n in range(outcome.size)
        ]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the first job is training, others wait
            progress = (_job(client, ids[0]) or {}).get("stages", {}).get("train", {})
            if (progress.get("progress") or {}).get("step"):
                break
            time.sleep(0.2)
        postgres.stop("immediate")
        down = time.monotonic()
        try:
            answered = client.http.get("/v1/jobs")
            outcome.check(answered.status_code == 503, f"while down: {answered.status_code}")
            outcome.count("API answers 503 while the database is down", answered.status_code == 503)
            time.sleep(DOWN_SECONDS)
        finally:
            postgres.start()
        outcome.time("database down", time.monotonic() - down)
        deadline = time.monotonic() + 900
        jobs = {}
        while time.monotonic() < deadline and len(jobs) < len(ids):
            for job_id in ids:
                job = _job(client, job_id)
                if job is not None and job["status"] in TERMINAL:
                    jobs[job_id] = job
            time.sleep(0.5)
        outcome.time("database back to all jobs ended", time.monotonic() - down)
        for job_id in ids:
            job = jobs.get(job_id)
            if not outcome.check(job is not None, f"{job_id}: did not end"):
                continue
            outcome.check(job["status"] == "succeeded", f"{job_id}: {job['status']}")
            outcome.count("succeeded", job["status"] == "succeeded")
            events = client.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
            seqs = [e["seq"] for e in events]
            outcome.check(seqs == list(range(1, len(seqs) + 1)), f"{job_id}: gaps in {seqs}")
            for stage, kind in OUTCOMES.items():
                n = sum(e["type"] == kind for e in events)
                outcome.check(n == 1, f"{job_id}: {stage} recorded {n} times")
            outcome.count("stage runs started again after the restart", _restarts(events))
    outcome.verdict()


def _restarts(events):
    starts = sum(e["type"] == "StageStarted" for e in events)
    return max(starts - len(OUTCOMES), 0)
