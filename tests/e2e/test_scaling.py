"""Trainers are competing consumers: three trainers work three jobs, a fourth waits."""

import time

import pytest

from services.cli.display import TERMINAL
from tests.e2e.test_trainer_shutdown import _running
from tests.factories import spec_dict

pytestmark = pytest.mark.e2e


def test_three_trainers_train_three_jobs_at_once_and_the_fourth_waits(tmp_path, tiny_model):
    with _running(tmp_path, trainers=3) as (launcher, client):
        ids = [
            client.submit(
                spec_dict(
                    tiny_model, name=f"scale-{n}", training={"max_steps": 30, "logging_steps": 5}
                )
            )["id"]
            for n in range(4)
        ]
        most, waited = 0, False
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            jobs = [client.job(i) for i in ids]
            training = [j for j in jobs if j["stages"]["train"]["status"] == "running"]
            queued = [
                j
                for j in jobs
                if j["stages"]["prepare"]["status"] == "succeeded"
                and j["stages"]["train"]["status"] == "pending"
            ]
            most = max(most, len(training))
            waited |= len(training) == 3 and len(queued) == 1
            if all(j["status"] in TERMINAL for j in jobs):
                break
            time.sleep(0.3)
        assert [j["status"] for j in jobs] == ["succeeded"] * 4, launcher.logs_tail(40)
        assert most == 3 and waited
        workers = {j["stages"]["train"]["worker"] for j in jobs}
        assert len(workers) == 3  # the fourth job ran on whichever trainer freed first
        for job_id in ids:
            started = [
                e
                for e in client.events(job_id)
                if e["type"] == "StageStarted" and e["stage"] == "train"
            ]
            assert len(started) == 1  # trained once
