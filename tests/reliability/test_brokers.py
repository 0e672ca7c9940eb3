"""The real brokers: RabbitMQ (Debian's server) restarted with messages in flight."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from services.dataprep.handler import handle as prepare
from shared.bus import Bus
from shared.jobspec import parse_spec
from shared.messages import PrepareDataset
from shared.settings import Settings
from shared.store import LocalStore
from shared.worker import Worker
from tests.factories import make_jobs, spec_dict
from tests.integration.conftest import RabbitNode

JOBS_PER_RESTART = 3
HANDLING_SECONDS = 2.0


class _Count(logging.Handler):
    """Counts log records that say ``text``."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.INFO)
        self.logger, self.text, self.n = logging.getLogger(logger), text, 0
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.n += self.text in record.getMessage()


def test_broker_restart_with_messages_in_flight(scenario, tmp_path, tiny_model):
    outcome = scenario(
        "restart the broker with messages in flight",
        full=10,
        ci=2,
        must_hold="0 messages lost, 0 duplicate side effects",
    )
    node = RabbitNode(tmp_path / "rabbitmq")
    node.start()
    settings = Settings(
        var_dir=tmp_path / "var",
        broker_url=node.url,
        poll_seconds=0.2,
        exchange=f"r{uuid.uuid4().hex[:8]}",
    )
    store = LocalStore(tmp_path / "var" / "store")
    jobs = make_jobs(settings, store)
    bus = Bus(settings)
    bus.declare()

    def slow_prepare(command: Any, ctx: Any) -> Any:
        time.sleep(HANDLING_SECONDS)  # long enough for the restart to hit mid-delivery
        return prepare(command, ctx)

    reconnects = _Count("shared.bus", "connection lost")
    redelivered = _Count("shared.worker", "duplicate delivery")
    worker = Worker("dataprep", slow_prepare, settings=settings, bus=bus, store=store)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    ids: list[str] = []

    def submit(job_id: str) -> None:
        spec = parse_spec(spec_dict(tiny_model, name=job_id))
        bus.publish(PrepareDataset(job_id=job_id, spec_uri=jobs.create(job_id, spec)))
        ids.append(job_id)

    def started(job_id: str) -> bool:
        return any(e.type == "StageStarted" for e in jobs.events(job_id))

    try:
        for n in range(outcome.size):
            batch = [f"restart-{n}-{k}" for k in range(JOBS_PER_RESTART)]
            for job_id in batch:
                submit(job_id)
            deadline = time.monotonic() + 60
            while not started(batch[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            outcome.check(started(batch[0]), f"restart {n}: nothing in flight")
            down = time.monotonic()
            node.stop()
            # A job submitted while the broker is down: the publish rides it out.
            late = threading.Thread(target=submit, args=(f"restart-{n}-late",))
            late.start()
            node.start()
            outcome.time("broker down (stop to accepting connections)", time.monotonic() - down)
            late.join(60)
            outcome.count("restarts")
        deadline = time.monotonic() + 120 + 20 * outcome.size
        while time.monotonic() < deadline:
            if all(jobs.outcome(job_id, "prepare") is not None for job_id in ids):
                break
            time.sleep(0.2)
        outcome.time("last restart to all prepared", time.monotonic() - down)
    finally:
        worker.stop.set()
        thread.join(30)
        bus.close()
        node.stop()
    for counter in (reconnects, redelivered):
        counter.logger.removeHandler(counter)
    outcome.count("worker reconnections", reconnects.n)
    outcome.count("in-flight deliveries redelivered after their stage succeeded", redelivered.n)
    outcome.count("jobs submitted", len(ids))
    for job_id in ids:
        events = jobs.events(job_id)
        prepared = sum(e.type == "DatasetPrepared" for e in events)
        starts = sum(e.type == "StageStarted" for e in events)
        outcome.count("jobs prepared", prepared >= 1)
        outcome.count("deliveries run again after a restart", max(starts - 1, 0))
        outcome.check(prepared >= 1, f"{job_id}: lost (never prepared)")
        outcome.check(prepared <= 1, f"{job_id}: prepared {prepared} times")
    outcome.check(reconnects.n >= outcome.size, "the worker did not lose its connection")
    outcome.check(
        len(ids) == outcome.size * (JOBS_PER_RESTART + 1), f"only {len(ids)} jobs submitted"
    )
    outcome.verdict()


def test_a_training_job_longer_than_the_delivery_timeout(scenario, tmp_path, s3_endpoint):
    """On SQS (kombu's transport against moto's SQS over HTTP): the trainer's delivery is
    kept in flight while it trains, and comes back once its worker is gone."""
    outcome = scenario(
        "a training job longer than the delivery timeout",
        full=5,
        ci=2,
        must_hold="no redelivery while the lease is alive; redelivered within the timeout plus "
        "one poll after the worker dies",
    )
    from shared.messages import ModelTrained, TrainModel
    from tests.unit.shared.test_bus_sqs import VISIBILITY, sqs_settings

    settings = sqs_settings(tmp_path, s3_endpoint, lease_seconds=3)
    store = LocalStore(tmp_path / "store")
    jobs = make_jobs(settings, store)
    bus = Bus(settings)
    bus.declare()
    runs: dict[str, list[str]] = {}

    def long_training(command: Any, ctx: Any) -> Any:
        runs.setdefault(command.job_id, []).append(ctx.worker)
        time.sleep(VISIBILITY * 3)  # three delivery timeouts
        return ModelTrained(job_id=command.job_id, manifest="file:///m", train_loss=1.0, steps=1)

    def start_trainers(n: int) -> list[tuple[Worker, threading.Thread]]:
        started = []
        for k in range(2):
            trainer = Worker("trainer", long_training, settings=settings, bus=Bus(settings),
                             store=store, leased=True)  # fmt: skip
            trainer.ctx.worker = f"trainer-{n}-{k}"
            thread = threading.Thread(target=trainer.run, daemon=True)
            thread.start()
            started.append((trainer, thread))
        return started

    try:
        for n in range(outcome.size):
            job_id = f"long-{n}"
            uri = jobs.create(job_id, parse_spec({"name": job_id}))
            bus.publish(TrainModel(job_id=job_id, spec_uri=uri, dataset_manifest="file:///d"))
            # A worker takes the delivery and dies without a word (no ack, no extension).
            deadline = time.monotonic() + 30
            with bus.connect() as conn:
                bound = bus.queues["trainer"].bind(conn.default_channel)
                taken = None
                while taken is None and time.monotonic() < deadline:
                    taken = bound.get(no_ack=False)
                died = time.monotonic()
            if not outcome.check(taken is not None, f"{job_id}: never delivered"):
                continue
            live = start_trainers(n)  # two live trainers compete for what comes back
            while job_id not in runs and time.monotonic() < deadline:
                time.sleep(0.05)
            back = time.monotonic() - died
            outcome.time("worker died to stage restarted", back)
            outcome.check(
                back <= VISIBILITY + settings.poll_seconds + 5.5,  # + SQS's 5 s long poll
                f"{job_id}: redelivered {back:.1f} s after the death",
            )
            while jobs.outcome(job_id, "train") is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(VISIBILITY + 1)  # a redelivery during training would have run by now
            for trainer, thread in live:
                trainer.stop.set()
                thread.join(15)
            outcome.count("long stages")
            outcome.count("runs", len(runs.get(job_id, [])))
            outcome.check(len(runs.get(job_id, [])) == 1, f"{job_id}: ran {runs.get(job_id)}")
    finally:
        bus.close()
    outcome.counts["stage length / delivery timeout"] = 3
    outcome.verdict()


def test_jobs_submitted_while_the_broker_is_down_run_once_it_is_back(
    scenario, tmp_path, tiny_model
):
    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from shared.outbox import pending
    from shared.settings import ApiSettings

    outcome = scenario(
        "submit while the broker is down",
        full=20,
        ci=4,
        must_hold="every submission answered 201 at once; every job prepared once the broker "
        "is back; 0 stranded in 'queued'",
    )
    node = RabbitNode(tmp_path / "rabbitmq")
    node.start()
    common = {
        "var_dir": tmp_path / "var",
        "broker_url": node.url,
        "poll_seconds": 0.2,
        "exchange": f"d{uuid.uuid4().hex[:8]}",
    }
    settings = ApiSettings(**common, api_key="k")
    store = LocalStore(tmp_path / "var" / "store")
    jobs = make_jobs(settings, store)
    worker_bus = Bus(Settings(**common))
    worker = Worker("dataprep", prepare, settings=Settings(**common), bus=worker_bus, store=store)
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = "Bearer k"
            thread.start()
            node.stop()
            ids = []
            for n in range(outcome.size):
                started = time.monotonic()
                response = client.post("/v1/jobs", json=spec_dict(tiny_model, name=f"down-{n}"))
                outcome.time("submit answered (broker down)", time.monotonic() - started)
                if outcome.check(response.status_code == 201, f"submit {n}: {response.text}"):
                    ids.append(response.json()["id"])
            outcome.count("commands kept in the outbox while down", pending(jobs))
            back = time.monotonic()
            node.start()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if all(jobs.outcome(job_id, "prepare") is not None for job_id in ids):
                    break
                time.sleep(0.2)
            outcome.time("broker back to all prepared", time.monotonic() - back)
    finally:
        worker.stop.set()
        thread.join(30)
        worker_bus.close()
        node.stop()
    for job_id in ids:
        prepared = sum(e.type == "DatasetPrepared" for e in jobs.events(job_id))
        outcome.count("jobs prepared", prepared >= 1)
        outcome.check(prepared == 1, f"{job_id}: prepared {prepared} times")
    outcome.check(len(ids) == outcome.size, f"only {len(ids)} of {outcome.size} submitted")
    outcome.check(
        outcome.counts.get("commands kept in the outbox while down", 0) == outcome.size,
        "the commands were not waiting in the outbox while the broker was down",
    )
    outcome.verdict()
