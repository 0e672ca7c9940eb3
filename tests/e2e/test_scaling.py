"""Trainers are competing consumers: three trainers work three jobs, a fourth waits."""

from datetime import datetime

import pytest

from services.cli.display import follow
from tests.e2e.test_trainer_shutdown import _running
from tests.factories import spec_dict

pytestmark = pytest.mark.e2e


def _training_interval(events):
    """(start, end) of the train stage, from its recorded events."""
    started = [e for e in events if e["type"] == "StageStarted" and e["stage"] == "train"]
    ended = [e for e in events if e["type"] == "ModelTrained"]
    assert len(started) == 1 and len(ended) == 1  # trained exactly once
    return (
        datetime.fromisoformat(started[0]["created_at"]),
        datetime.fromisoformat(ended[0]["created_at"]),
    )


def _most_at_once(intervals):
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


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
        jobs = [follow(client, job_id, timeout=400, poll=1.0) for job_id in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 4, launcher.logs_tail(40)
        intervals = [_training_interval(client.events(job_id)) for job_id in ids]
        assert _most_at_once(intervals) == 3
        first_end = min(end for _, end in intervals)
        assert max(start for start, _ in intervals) >= first_end  # the fourth waited
        assert len({j["stages"]["train"]["worker"] for j in jobs}) == 3
