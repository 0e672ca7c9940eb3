"""The worker loop over kombu's in-memory transport, with fake handlers."""

import threading
import time
import uuid

import pytest

from shared.bus import ATTEMPT_HEADER, REASON_HEADER, Bus
from shared.errors import DatasetError
from shared.jobspec import JobSpec
from shared.messages import (
    DatasetPrepared,
    JobRetried,
    PrepareDataset,
    StageFailed,
    StageProgress,
    StageStarted,
    parse_message,
)
from shared.settings import Settings
from shared.store import LocalStore
from shared.worker import Worker
from tests.factories import make_jobs


@pytest.fixture
def env(tmp_path):
    settings = Settings(
        var_dir=tmp_path,
        broker_url="memory://",
        exchange=f"t{uuid.uuid4().hex[:8]}",
        poll_seconds=0.05,
        max_attempts=3,
    )
    store = LocalStore(tmp_path / "store")
    jobs = make_jobs(settings, store)
    spec_uri = jobs.create("job-1", JobSpec(name="job"))
    bus = Bus(settings)
    bus.declare()
    yield settings, store, jobs, bus, PrepareDataset(job_id="job-1", spec_uri=spec_uri)
    bus.close()


def _drain(bus, queue, timeout=5.0):
    """Messages on a queue, waiting until at least one arrives."""
    with bus.connect() as conn:
        bound = queue.bind(conn.default_channel)
        deadline = time.monotonic() + timeout
        got = []
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                if got:
                    return got
                time.sleep(0.02)
                continue
            got.append(message)
        return got


def _run(worker, until, timeout=10.0):
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.stop.set()
    thread.join(5)
    assert until(), "condition not reached in time"


class _Delivery:
    """A fake kombu delivery that records its ack."""

    def __init__(self, headers, routing_key):
        self.headers, self.delivery_info, self.acked = headers, {"routing_key": routing_key}, False

    @property
    def acknowledged(self):
        return self.acked

    def ack(self):
        assert not self.acked, "acked twice"
        self.acked = True


def _serve(env, handler, *, until):
    """Run a dataprep worker with the handler on the env's command until an event appears."""
    settings, store, jobs, bus, cmd = env
    worker = Worker("dataprep", handler, settings=settings, bus=bus, store=store)
    bus.publish(cmd)
    _run(worker, lambda: until in _types(jobs))


def _types(jobs):
    return [e.type for e in jobs.events("job-1")]


def test_success_records_event_and_publishes_next_command(env):
    settings, store, jobs, bus, cmd = env
    handled = []

    def handler(command, ctx):
        handled.append(command)
        return DatasetPrepared(job_id=command.job_id, manifest="file:///m", counts={"train": 3})

    _serve(env, handler, until="DatasetPrepared")
    assert handled == [cmd]
    assert _types(jobs) == ["StageStarted", "DatasetPrepared"]
    [train] = _drain(bus, bus.queues["trainer"])
    nxt = parse_message(train.payload)
    assert nxt.type == "TrainModel" and nxt.dataset_manifest == "file:///m"


def test_permanent_error_fails_the_job_without_retry(env):
    settings, store, jobs, bus, cmd = env
    calls = []

    def handler(command, ctx):
        calls.append(1)
        raise DatasetError("dataset.source: file not found: x.jsonl")

    _serve(env, handler, until="StageFailed")
    failed = jobs.events("job-1")[-1]
    assert failed.error == "dataset.source: file not found: x.jsonl"
    assert failed.permanent and failed.error_type == "DatasetError"
    assert calls == [1]
    assert _drain(bus, bus.dead_queue, timeout=0.3) == []


def test_transient_error_is_retried_then_dead_lettered(env):
    settings, store, jobs, bus, cmd = env

    def handler(command, ctx):
        raise RuntimeError("flaky")

    _serve(env, handler, until="StageFailed")
    started = [e for e in jobs.events("job-1") if e.type == "StageStarted"]
    assert [e.attempt for e in started] == [1, 2, 3]
    failed = jobs.events("job-1")[-1]
    assert failed.type == "StageFailed" and not failed.permanent and failed.attempts == 3
    [dead] = _drain(bus, bus.dead_queue)
    assert dead.headers[REASON_HEADER] == "flaky"
    assert parse_message(dead.payload).job_id == "job-1"


def test_a_dead_letter_the_broker_cannot_take_costs_the_copy_not_the_worker(
    env, monkeypatch, caplog
):
    """A full disk under the folder broker (the reliability scenario's): the failed job is
    recorded and its delivery done with, the worker goes on to the next command (the folder
    transport's error killed it; here, as a connection lost, it would come back)."""
    from amqp.exceptions import ChannelError

    settings, store, jobs, bus, cmd = env

    def full(*args, **kwargs):
        raise ChannelError("cannot add a message file to var/broker/messages")

    def handler(command, ctx):
        if command.job_id == "job-1":
            raise RuntimeError("No space left on device")
        return DatasetPrepared(job_id=command.job_id, manifest="file:///m", counts={"train": 3})

    monkeypatch.setattr(bus, "dead_letter", full)
    worker = Worker("dataprep", handler, settings=settings, bus=bus, store=store)
    second = PrepareDataset(job_id="job-2", spec_uri=jobs.create("job-2", JobSpec(name="job")))
    bus.publish(cmd)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while "StageFailed" not in _types(jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs.events("job-1")[-1].type == "StageFailed"
        bus.publish(second)
        while not jobs.outcome("job-2", "prepare") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert thread.is_alive() and jobs.outcome("job-2", "prepare").type == "DatasetPrepared"
    finally:
        worker.stop.set()
        thread.join(5)
    said = [r.getMessage() for r in caplog.records]
    assert any("dead letter not kept (cannot add a message file" in m for m in said)
    assert not any("broker connection lost" in m for m in said)


def test_poison_message_is_dead_lettered_with_reason(env):
    settings, store, jobs, bus, _ = env
    worker = Worker("dataprep", lambda c, x: None, settings=settings, bus=bus, store=store)
    with bus.connect() as conn:
        conn.Producer().publish(
            {"type": "PrepareDataset", "job_id": "job-1"},
            exchange=bus.exchange,
            routing_key="cmd.PrepareDataset",
            serializer="json",
        )
    dead = []
    _run(worker, lambda: dead.extend(_drain(bus, bus.dead_queue, timeout=0.1)) or dead)
    assert "spec_uri" in dead[0].headers[REASON_HEADER]


def test_wrong_command_for_service_is_refused(env):
    settings, store, jobs, bus, cmd = env
    worker = Worker("trainer", lambda c, x: None, settings=settings, bus=bus, store=store)

    delivery = _Delivery({ATTEMPT_HEADER: 1}, "cmd.TrainModel")
    worker.on_message(cmd.model_dump(mode="json"), delivery)
    assert delivery.acked
    [dead] = _drain(bus, bus.dead_queue)
    assert "trainer takes TrainModel, got PrepareDataset" in dead.headers[REASON_HEADER]


def test_cancelled_stage_ends_the_job_as_cancelled(env):
    from shared.errors import Cancelled

    settings, store, jobs, bus, cmd = env

    def handler(command, ctx):
        raise Cancelled("job job-1 cancelled at step 3")

    _serve(env, handler, until="JobCancelled")
    assert jobs.summary("job-1")["status"] == "cancelled"
    assert _drain(bus, bus.queues["trainer"], timeout=0.3) == []


def test_command_of_a_cancelled_job_is_not_run(env):
    settings, store, jobs, bus, cmd = env
    calls = []
    jobs.request_cancel("job-1")
    worker = Worker(
        "dataprep", lambda c, x: calls.append(c), settings=settings, bus=bus, store=store
    )
    bus.publish(cmd)
    _run(worker, lambda: "JobCancelled" in _types(jobs))
    assert calls == []


def test_interrupted_stage_is_requeued_without_using_an_attempt(env):
    from shared.errors import Interrupted

    settings, store, jobs, bus, cmd = env
    worker = Worker(
        "dataprep",
        lambda c, x: (_ for _ in ()).throw(Interrupted("stopping")),
        settings=settings,
        bus=bus,
        store=store,
    )

    delivery = _Delivery({ATTEMPT_HEADER: 2}, "cmd.PrepareDataset")
    worker.on_message(cmd.model_dump(mode="json"), delivery)
    assert delivery.acked
    [again] = _drain(bus, bus.queues["dataprep"])
    assert again.headers[ATTEMPT_HEADER] == 2
    assert parse_message(again.payload) == cmd
    assert "StageFailed" not in _types(jobs)


def test_leased_worker_drops_a_delivery_whose_job_another_worker_holds(env):
    from shared.leases import Lease

    settings, store, jobs, bus, _ = env
    from shared.messages import TrainModel

    cmd = TrainModel(
        job_id="job-1",
        spec_uri=jobs.store.uri("jobs/job-1/spec.json"),
        dataset_manifest="file:///m",
    )
    assert Lease(jobs.ledger, "job-1", "train", owner="other", ttl=60).acquire()
    calls = []
    worker = Worker(
        "trainer",
        lambda c, x: calls.append(c),
        settings=settings,
        bus=bus,
        store=store,
        leased=True,
    )

    delivery = _Delivery({}, "cmd.TrainModel")
    worker.on_message(cmd.model_dump(mode="json"), delivery)
    assert delivery.acked and calls == []
    assert "StageStarted" not in _types(jobs)


def test_a_leased_worker_is_protected_from_scale_in_while_it_works(env, monkeypatch):
    """On ECS the trainer asks its agent for scale-in protection for the job's duration."""
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from shared.messages import ModelTrained, TrainModel

    settings, store, jobs, bus, _ = env
    requests = []

    class Agent(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body, len(calls)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ECS_AGENT_URI", f"http://127.0.0.1:{server.server_port}/api/task")
    calls = []

    def train(command, ctx):
        calls.append(command)
        return ModelTrained(job_id=command.job_id, manifest="file:///m", train_loss=1.0, steps=1)

    cmd = TrainModel(
        job_id="job-1",
        spec_uri=jobs.store.uri("jobs/job-1/spec.json"),
        dataset_manifest="file:///m",
    )
    worker = Worker("trainer", train, settings=settings, bus=bus, store=store, leased=True)
    worker.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.TrainModel"))
    server.shutdown()
    assert requests == [
        (
            "/api/task/task-protection/v1/state",
            {"ProtectionEnabled": True, "ExpiresInMinutes": 2880},
            0,
        ),
        ("/api/task/task-protection/v1/state", {"ProtectionEnabled": False}, 1),
    ]


def test_a_command_whose_workers_keep_dying_fails_the_job_instead_of_crash_looping(env):
    settings, store, jobs, bus, cmd = env
    # Three deliveries whose worker died mid-stage (kill -9, OOM): started, never finished.
    for _ in range(settings.max_attempts):
        jobs.record(StageStarted(job_id="job-1", stage="prepare", worker="w", attempt=1))
    called = []
    _serve(env, lambda c, x: called.append(c), until="StageFailed")
    failed = jobs.events("job-1")[-1]
    assert failed.error_type == "WorkerDied" and failed.attempts == 3
    assert "died 3 times" in failed.error
    assert called == []  # the crashing input is not run a fourth time
    [dead] = _drain(bus, bus.dead_queue)
    assert "died 3 times" in dead.headers[REASON_HEADER]


def test_graceful_interruptions_and_retries_do_not_count_as_deaths(env):
    _, _, jobs, _, _ = env
    started = StageStarted(job_id="job-1", stage="train", worker="w", attempt=1)
    interrupted = StageProgress(
        job_id="job-1", stage="train", progress={"phase": "interrupted", "interrupted": True}
    )
    for event in [started, interrupted, started, interrupted, started]:
        jobs.record(event)
    assert jobs.deaths("job-1", "train") == 1  # only the last start is still open
    jobs.record(started)
    assert jobs.deaths("job-1", "train") == 2
    jobs.record(JobRetried(job_id="job-1", stage="train"))
    assert jobs.deaths("job-1", "train") == 0
    assert jobs.deaths("job-1", "prepare") == 0


def test_a_stage_delivered_again_after_its_success_is_not_run_or_recorded_again(env):
    settings, store, jobs, bus, cmd = env
    done = DatasetPrepared(job_id="job-1", manifest="file:///m", counts={"train": 3})
    jobs.record(done)
    called = []
    worker = Worker(
        "dataprep", lambda c, x: called.append(c), settings=settings, bus=bus, store=store
    )
    worker.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    assert called == [] and _types(jobs) == ["DatasetPrepared"]
    # The worker that recorded it may have died before sending the next command: sent now.
    [train] = _drain(bus, bus.queues["trainer"])
    assert parse_message(train.payload).dataset_manifest == "file:///m"
    # Once the next stage has started, a further duplicate sends nothing.
    jobs.record(StageStarted(job_id="job-1", stage="train", worker="w", attempt=1))
    worker.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    assert _drain(bus, bus.queues["trainer"], timeout=0.3) == []


def test_a_command_delivered_after_its_job_failed_is_not_run_until_a_retry(env):
    """At-least-once delivery (SQS, or a lease re-sent) may bring a command back after its
    job failed: it is acked and not run, recorded or dead-lettered. A retry runs it."""
    settings, store, jobs, bus, cmd = env
    failed = StageFailed(job_id="job-1", stage="prepare", error="x", error_type="DatasetError")
    jobs.record(failed)
    called = []

    def handler(command, ctx):
        called.append(command)
        return DatasetPrepared(job_id=command.job_id, manifest="file:///m", counts={"train": 3})

    worker = Worker("dataprep", handler, settings=settings, bus=bus, store=store)
    delivery = _Delivery({}, "cmd.PrepareDataset")
    worker.on_message(cmd.model_dump(mode="json"), delivery)
    assert called == [] and delivery.acked
    assert _types(jobs) == ["StageFailed"]
    assert jobs.summary("job-1")["status"] == "failed"
    assert _drain(bus, bus.dead_queue, timeout=0.3) == []
    jobs.record(JobRetried(job_id="job-1", stage="prepare"))
    worker.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    assert called == [cmd]
    assert _types(jobs)[-1] == "DatasetPrepared"


def test_a_worker_whose_command_was_sent_again_during_a_hiccup_stops_and_the_new_one_runs(env):
    """A database hiccup longer than the lease: the reconciler sent the command again, the
    old worker's renewal then succeeded and the new delivery was dropped as held by a live
    worker (the job stuck running once the old one died). Now the old worker's renewal
    fails, its stage stops at its next report, and the new delivery takes the lease."""
    from shared.ledger import tables as t
    from shared.reconciler import reconcile_once

    settings, store, jobs, bus, cmd = env
    settings = settings.model_copy(update={"lease_seconds": 0.6})

    def resent():  # the lease expired while the database was away; the reconciler acts
        while reconcile_once(jobs) != ["job-1"]:
            with jobs.ledger.write() as conn:
                conn.execute(t.leases.update().values(expires_at=jobs.ledger.now - 1))

    reports = []

    def prepare(command, ctx):
        resent()
        for n in range(100):
            reports.append(n)
            ctx.progress({"phase": "tokenizing", "rows_done": n})
            time.sleep(0.05)
        raise AssertionError("not stopped")

    old = Worker("dataprep", prepare, settings=settings, bus=bus, store=store, leased=True)
    old.ctx.worker = "old"
    old.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    assert old.ctx.lease_lost.is_set() and len(reports) < 100  # stopped before its end
    assert "StageFailed" not in _types(jobs)
    [again] = _drain(bus, bus.queues["dataprep"])
    assert again.headers[ATTEMPT_HEADER] == 2
    done = DatasetPrepared(job_id="job-1", manifest="file:///m", counts={"train": 3})
    new = Worker(
        "dataprep", lambda c, x: done, settings=settings, bus=bus, store=store, leased=True
    )
    new.ctx.worker = "new"
    new.on_message(again.payload, _Delivery(again.headers, "cmd.PrepareDataset"))
    assert jobs.summary("job-1")["stages"]["prepare"]["status"] == "succeeded"


@pytest.mark.parametrize("how", ["handed back", "retried"])
def test_a_command_sent_again_while_its_holder_finishes_is_run_not_dropped(env, monkeypatch, how):
    """The holder of a stage's lease hands its command back (a transient error) or fails
    and is retried by its user, then ends its tracking run or dead-letters before letting
    the lease go: the command sent meanwhile reached another worker, which found the lease
    held and dropped it; the holder then released it and nothing sent the command again
    (the job stayed queued or running for good). The command now supersedes the lease."""
    from shared.leases import Lease
    from shared.outbox import relay_once

    settings, store, jobs, bus, cmd = env
    done = DatasetPrepared(job_id="job-1", manifest="file:///m", counts={"train": 3})
    ran = []

    def fresh(command, ctx):
        ran.append(ctx.worker)
        return done

    new = Worker("dataprep", fresh, settings=settings, bus=bus, store=store, leased=True)
    new.ctx.worker = "new"
    release = Lease.release

    def slow_release(lease):  # the new delivery arrives before the holder lets go
        if lease.owner == "old" and not ran:
            if how == "retried":
                jobs.retry("job-1", retried=JobRetried(job_id="job-1", stage="prepare"), send=[cmd])
            relay_once(jobs, bus)
            [again] = _drain(bus, bus.queues["dataprep"])
            new.on_message(again.payload, _Delivery(again.headers, "cmd.PrepareDataset"))
        release(lease)

    monkeypatch.setattr(Lease, "release", slow_release)

    def failing(command, ctx):
        if how == "retried":
            raise DatasetError("terms.jsonl: line 3: not a JSON object")  # fails the job
        raise OSError("connection reset")  # transient: the command goes back to the queue

    old = Worker("dataprep", failing, settings=settings, bus=bus, store=store, leased=True)
    old.ctx.worker = "old"
    old.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    assert ran == ["new"]
    assert jobs.summary("job-1")["stages"]["prepare"]["status"] == "succeeded"


def test_a_duplicate_earlier_command_leaves_the_next_stages_live_lease_alone(env):
    """A duplicate PrepareDataset (delivered at least once) sends TrainModel again when no
    train start is recorded yet; a trainer that has just taken the train lease keeps it
    (superseding it stopped a training that was running as it should)."""
    from shared.leases import Lease

    settings, store, jobs, bus, cmd = env
    jobs.record(StageStarted(job_id="job-1", stage="prepare", worker="dp", attempt=1))
    jobs.record(DatasetPrepared(job_id="job-1", manifest="file:///m", counts={"train": 3}))
    trainer = Lease(jobs.ledger, "job-1", "train", owner="trainer-1", ttl=60)
    assert trainer.acquire()
    worker = Worker(
        "dataprep", lambda c, x: None, settings=settings, bus=bus, store=store, leased=True
    )
    worker.on_message(cmd.model_dump(mode="json"), _Delivery({}, "cmd.PrepareDataset"))
    [again] = _drain(bus, bus.queues["trainer"])
    assert parse_message(again.payload).type == "TrainModel"
    assert trainer.renew()
