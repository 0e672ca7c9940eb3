"""Delivery faults with the real publisher against the Bedrock stand-in: the publisher dies
before, between and after the import call; the command is delivered again (twice)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from services.dataprep.handler import handle as prepare
from services.publisher.handler import handle as publish
from services.publisher.importer import Importer, ImportRecords
from shared.bus import REASON_HEADER, Bus
from shared.jobs import JobRecords
from shared.jobspec import parse_spec
from shared.messages import PrepareDataset
from shared.settings import Settings
from shared.store import LocalStore
from shared.worker import Worker
from tests.factories import make_jobs, spec_dict
from tests.unit.services.test_publisher_bedrock import (  # noqa: F401 - fixtures
    _bedrock_job,
    bedrock_env,
    bucket,
    standin,
)

#: where the publisher dies: (label, class, method, whether the retry calls create again:
#: only when the call went out and its record did not)
CRASH_POINTS = [
    ("between the create call and its record", ImportRecords, "set_job_arn", True),
    ("before the create call", Importer, "create", False),
    ("between the create call and its record", ImportRecords, "set_job_arn", True),
    ("while polling the import", Importer, "wait", False),
]


def _die_once(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, label: str) -> list[str]:
    """Make ``cls.name`` kill the publisher (raise) once, then behave again."""
    real, died = getattr(cls, name), []

    def dying(*args: Any, **kwargs: Any) -> Any:
        if died:
            return real(*args, **kwargs)
        died.append(label)
        raise RuntimeError(f"publisher died {label}")

    monkeypatch.setattr(cls, name, dying)
    return died


def test_publisher_crash_between_import_call_and_record(
    scenario,
    published,
    bedrock_env,  # noqa: F811
    standin,  # noqa: F811
):
    outcome = scenario(
        "crash the publisher between the import call and recording it",
        full=20,
        ci=4,
        must_hold="exactly one import job per model; the same client token on every retry",
    )
    standin.model_quota = 1000  # one model per run, past Bedrock's default quota of 3
    for n in range(outcome.size):
        # Half the runs die at the hard point (the call went out, its record did not).
        label, cls, name, called_again = CRASH_POINTS[n % len(CRASH_POINTS)]
        ctx, cmd = _bedrock_job(published, f"crash-{n}-{uuid.uuid4().hex[:6]}")
        started = time.monotonic()
        with pytest.MonkeyPatch.context() as patch:
            died = _die_once(patch, cls, name, label)
            with pytest.raises(RuntimeError, match="publisher died"):
                publish(cmd, ctx)
            publish(cmd, ctx)  # the redelivery after the crash
            publish(cmd, ctx)  # and a duplicate of it
        outcome.time("crash to published", time.monotonic() - started)
        outcome.count(f"died {label}")
        model = f"terms-{cmd.job_id}"
        ours = f"{model}-"  # the imported name adds the artifact digest
        jobs = [j for j in standin.jobs.values() if j.request["importedModelName"].startswith(ours)]
        creates = [
            c
            for c in standin.calls_to("CreateModelImportJob")
            if c["importedModelName"].startswith(ours)
        ]
        outcome.count("create calls", len(creates))
        outcome.count("import jobs", len(jobs))
        outcome.check(died == [label], f"{model}: the crash {label} was not injected")
        outcome.check(len(jobs) == 1, f"{model}: {len(jobs)} import jobs")
        outcome.check(len(creates) == 1 + called_again, f"{model}: {len(creates)} create calls")
        outcome.check(
            len({c["clientRequestToken"] for c in creates}) == 1,
            f"{model}: the client token changed between tries",
        )
        manifest = ctx.jobs.manifest(cmd.job_id, "publish")
        outcome.check(
            manifest["bedrock"]["job_arn"] == jobs[0].arn if jobs else False,
            f"{model}: the manifest names another import job",
        )
    outcome.verdict()


def _drain(bus: Bus, queue: Any, want: int, timeout: float) -> list[Any]:
    """Up to ``want`` messages from a queue, waiting at most ``timeout`` seconds."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    with bus.connect() as conn:
        bound = queue.bind(conn.default_channel)
        while len(got) < want and time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                time.sleep(0.05)
            else:
                got.append(message)
    return got


def test_poison_messages_are_dead_lettered_and_fail_only_their_jobs(scenario, tmp_path, tiny_model):
    outcome = scenario(
        "poison message",
        full=10,
        ci=4,
        must_hold="dead-lettered after the configured attempts; the job failed with the reason; "
        "other jobs unaffected",
    )
    settings = Settings(var_dir=tmp_path / "var", poll_seconds=0.05, max_attempts=3)
    store = LocalStore(tmp_path / "var" / "store")
    jobs = make_jobs(settings, store)
    bus = Bus(settings)
    bus.declare()

    def handler(command: Any, ctx: Any) -> Any:
        if command.job_id.startswith("poison"):  # an input the stage chokes on, every time
            raise RuntimeError(f"cannot handle {command.job_id}: tokenizer crashed on row 7")
        return prepare(command, ctx)

    worker = Worker("dataprep", handler, settings=settings, bus=bus, store=store)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    good, poison = [], []
    started = time.monotonic()
    for n in range(outcome.size):
        for kind, ids in (("good", good), ("poison", poison)):
            job_id = f"{kind}-{n}"
            spec = parse_spec(spec_dict(tiny_model, name=job_id))
            bus.publish(PrepareDataset(job_id=job_id, spec_uri=jobs.create(job_id, spec)))
            ids.append(job_id)
        with bus.connect() as conn:  # and a message that is not a command at all
            conn.Producer().publish(
                {"type": "PrepareDataset", "garbage": n},
                exchange=bus.exchange,
                routing_key="cmd.PrepareDataset",
                serializer="json",
            )
    expected_dead = 2 * outcome.size
    dead = _drain(bus, bus.dead_queue, expected_dead, timeout=60 + 10 * outcome.size)

    def ended(job_id: str) -> bool:
        return any(e.type in ("DatasetPrepared", "StageFailed") for e in jobs.events(job_id))

    deadline = time.monotonic() + 60 + 10 * outcome.size
    while not all(ended(j) for j in good + poison) and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome.time("all messages settled", time.monotonic() - started)
    worker.stop.set()
    thread.join(10)
    bus.close()
    outcome.count("poison commands", len(poison))
    outcome.count("undecodable messages", outcome.size)
    outcome.count("good jobs", len(good))
    outcome.count("dead-lettered", len(dead))
    reasons = [m.headers.get(REASON_HEADER, "") for m in dead]
    outcome.check(len(dead) == expected_dead, f"{len(dead)} of {expected_dead} dead-lettered")
    outcome.check(all(reasons), "a dead letter without its reason")
    for job_id in poison:
        events = jobs.events(job_id)
        starts = [e.attempt for e in events if e.type == "StageStarted"]
        failed = [e for e in events if e.type == "StageFailed"]
        outcome.check(starts == [1, 2, 3], f"{job_id}: attempts {starts}, not 1..3")
        outcome.check(
            len(failed) == 1 and "tokenizer crashed on row 7" in failed[0].error,
            f"{job_id}: not failed with the reason",
        )
        outcome.count("poison jobs failed with the reason", len(failed) == 1)
    for job_id in good:
        prepared = [e for e in jobs.events(job_id) if e.type == "DatasetPrepared"]
        outcome.check(len(prepared) == 1, f"{job_id}: good job not prepared once")
        outcome.count("good jobs prepared", len(prepared) == 1)
    outcome.verdict()


class TwiceBus(Bus):
    """A broker that delivers every message twice (at-least-once at its worst)."""

    def publish(self, message: Any, *, headers: dict[str, Any] | None = None) -> None:
        super().publish(message, headers=headers)
        super().publish(message, headers=headers)


class CountingWorker(Worker):
    """A worker that counts the deliveries it gets."""

    deliveries = 0

    def on_message(self, body: Any, message: Any) -> None:
        CountingWorker.deliveries += 1
        super().on_message(body, message)


def _run_pipeline(bus: Bus, settings: Settings, store: LocalStore, job_id: str, spec: Any) -> int:
    """The four stage workers (real handlers) in threads until the job is published; how many
    deliveries they got."""
    import importlib

    jobs = make_jobs(settings, store)
    CountingWorker.deliveries = 0
    workers = [
        CountingWorker(
            service,
            importlib.import_module(f"services.{service}.handler").handle,
            settings=settings,
            bus=bus,
            store=store,
            leased=service == "trainer",
        )
        for service in ("dataprep", "trainer", "evaluator", "publisher")
    ]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    bus.publish(PrepareDataset(job_id=job_id, spec_uri=jobs.create(job_id, spec)))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        kinds = [e.type for e in jobs.events(job_id)]
        if "ModelPublished" in kinds or "StageFailed" in kinds:
            break
        time.sleep(0.2)
    # Let every duplicate be delivered and handled: the broker's folder stays empty.
    messages, quiet_since = settings.broker_dir / "messages", time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 2:
        if any(messages.iterdir()):
            quiet_since = time.monotonic()
        time.sleep(0.1)
    for worker in workers:
        worker.stop.set()
    for thread in threads:
        thread.join(30)
    return CountingWorker.deliveries


def _digests(jobs: JobRecords, job_id: str) -> dict[str, Any]:
    """Every artifact's digest: data shards, model files (the card names the job: left out)."""
    prepared = jobs.manifest(job_id, "prepare")
    published = jobs.manifest(job_id, "publish")
    return {
        "shards": {s: [x["sha256"] for x in v] for s, v in prepared["shards"].items()},
        "model files": {k: v for k, v in published["files"].items() if k != "README.md"},
        "tuned metrics": jobs.manifest(job_id, "evaluate")["tuned"],
    }


def test_every_message_delivered_twice(
    scenario,
    tmp_path,
    tiny_model,
    bedrock_env,  # noqa: F811
    standin,  # noqa: F811
):
    outcome = scenario(
        "every message delivered twice",
        full=1,
        ci=1,
        must_hold="all stages: identical artifact digests; no duplicate external calls",
    )
    settings = Settings(var_dir=tmp_path / "var", poll_seconds=0.05)
    store = LocalStore(tmp_path / "var" / "store")
    jobs = make_jobs(settings, store)
    runs = {}
    for label, bus_class in (("once", Bus), ("twice", TwiceBus)):
        job_id = f"dup-{label}"
        spec = parse_spec(
            spec_dict(tiny_model, name=job_id, publish={"target": "bedrock", "model_name": job_id})
        )
        bus = bus_class(settings)
        bus.declare()
        started = time.monotonic()
        deliveries = _run_pipeline(bus, settings, store, job_id, spec)
        outcome.count(f"deliveries, every message {label}", deliveries)
        bus.close()
        outcome.time(f"pipeline, every message {label}", time.monotonic() - started)
        runs[label] = job_id
        events = jobs.events(job_id)
        for kind in ("DatasetPrepared", "ModelTrained", "ModelEvaluated", "ModelPublished"):
            n = sum(e.type == kind for e in events)
            outcome.check(n == 1, f"{label}: {kind} recorded {n} times")
        starts = sum(e.type == "StageStarted" for e in events)
        outcome.check(starts == 4, f"{label}: {starts} stage starts, not 4")
        creates = [
            c
            for c in standin.calls_to("CreateModelImportJob")
            if c["importedModelName"].startswith(f"{job_id}-")
        ]
        outcome.count(f"CreateModelImportJob calls, delivered {label}", len(creates))
        outcome.check(len(creates) == 1, f"{label}: {len(creates)} import calls")
    once, twice = (_digests(jobs, runs[k]) for k in ("once", "twice"))
    for part in once:
        same = once[part] == twice[part]
        outcome.count(f"{part} identical", int(same))
        outcome.check(same, f"{part} differ between single and double delivery")
    outcome.check(
        outcome.counts["deliveries, every message twice"]
        >= 2 * outcome.counts["deliveries, every message once"],
        "the duplicates were not delivered",
    )
    outcome.verdict()
