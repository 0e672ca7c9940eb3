"""The bus and the worker on SQS through kombu's SQS transport, against a local SQS endpoint
(moto's server over HTTP): long stages stay in flight, dead workers' messages come back."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlparse

import boto3
import pytest

from shared.bus import Bus
from shared.jobspec import JobSpec
from shared.messages import DatasetPrepared, PrepareDataset
from shared.settings import Settings
from shared.store import LocalStore
from shared.worker import Worker
from tests.factories import make_jobs

VISIBILITY = 2


def sqs_settings(tmp_path, s3_endpoint, **extra) -> Settings:
    """Settings for kombu's SQS transport against moto's server (it speaks SQS on the same
    port as S3), with a short visibility timeout and a fresh queue prefix."""
    endpoint = urlparse(s3_endpoint)
    return Settings(
        var_dir=tmp_path,
        broker_url=f"sqs://test:test@{endpoint.hostname}:{endpoint.port}",
        exchange=f"t{uuid.uuid4().hex[:8]}",
        poll_seconds=0.2,
        sqs_visibility_seconds=VISIBILITY,
        sqs_is_secure=False,
        **extra,
    )


@pytest.fixture
def sqs_env(tmp_path, s3_endpoint):
    settings = sqs_settings(tmp_path, s3_endpoint)
    store = LocalStore(tmp_path / "store")
    jobs = make_jobs(settings, store)
    bus = Bus(settings)
    bus.declare()
    sqs = boto3.client("sqs", endpoint_url=s3_endpoint)
    url = sqs.get_queue_url(QueueName=f"{settings.exchange}-dataprep")["QueueUrl"]
    cmd = PrepareDataset(job_id="job-1", spec_uri=jobs.create("job-1", JobSpec(name="job")))
    yield settings, store, jobs, bus, cmd, sqs, url
    bus.close()


def _counts(sqs, url):
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def _start(worker):
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_a_stage_longer_than_the_visibility_timeout_runs_once(sqs_env):
    settings, store, jobs, bus, cmd, sqs, url = sqs_env
    calls = []
    in_flight = []

    def slow(command, ctx):
        calls.append(ctx.worker)
        time.sleep(VISIBILITY * 3)  # three visibility timeouts
        in_flight.append(_counts(sqs, url))
        return DatasetPrepared(job_id=command.job_id, manifest="file:///m", counts={"train": 1})

    workers = [Worker("dataprep", slow, settings=settings, bus=Bus(settings), store=store)]
    workers.append(Worker("dataprep", slow, settings=settings, bus=Bus(settings), store=store))
    workers[1].ctx.worker = "second"
    threads = [_start(w) for w in workers]
    bus.publish(cmd)
    deadline = time.monotonic() + 30
    while "DatasetPrepared" not in {e.type for e in jobs.events("job-1")}:
        assert time.monotonic() < deadline, "the stage never finished"
        time.sleep(0.2)
    time.sleep(VISIBILITY + 1)  # had it become visible again, the other worker would run it
    for w in workers:
        w.stop.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert in_flight == [(0, 1)]  # still held, invisible, while the stage ran
    assert _counts(sqs, url) == (0, 0)  # acked: deleted at the end, not lost


def test_a_dead_workers_message_comes_back_after_the_visibility_timeout(sqs_env):
    settings, store, jobs, bus, cmd, sqs, url = sqs_env
    bus.publish(cmd)
    with bus.connect() as conn:  # a worker takes the message, then dies without acking
        taken = bus.queues["dataprep"].bind(conn.default_channel).get(no_ack=False)
        assert taken is not None
        died = time.monotonic()
    assert _counts(sqs, url) == (0, 1)
    got = None
    with bus.connect() as conn:
        bound = bus.queues["dataprep"].bind(conn.default_channel)
        while got is None and time.monotonic() - died < VISIBILITY + 5:
            got = bound.get(no_ack=False)
            time.sleep(0.1)
        assert got is not None, "the message was lost"
        assert got.payload["job_id"] == "job-1"
        assert time.monotonic() - died >= VISIBILITY - 0.5
        got.ack()
