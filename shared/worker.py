"""The loop every stage service runs: receive a command, run the handler, record, continue.

The handler decides; this module wires it to the bus and the job's record. Order matters:
the handler stores its outputs and manifest, then the event is recorded with the next
command in the ledger's outbox (one transaction), the outbox is relayed to the bus, and
only then is the delivery acked. A crash anywhere before the ack redelivers the command,
and the handler finds its manifest and does no work twice.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from shared import worker_metrics
from shared.bus import ATTEMPT_HEADER, SERVICE_COMMANDS, Bus
from shared.ecs import protect_task
from shared.errors import Interrupted, LedgerUnavailable, MessageError
from shared.health import check_health, heartbeat_path
from shared.jobs import JobRecords
from shared.leases import Lease, LeaseKeeper
from shared.ledger import open_ledger
from shared.lifetime import end_with_launcher
from shared.logs import configure_logging, log_context
from shared.messages import (
    STAGE_OF_COMMAND,
    Command,
    Event,
    StageFailed,
    StageProgress,
    dump_message,
    parse_message,
)
from shared.outbox import Relay, relay_once
from shared.periodic import Periodic
from shared.pipeline import next_command
from shared.settings import Settings
from shared.stage import Handler, StageContext, end_run, run_stage
from shared.store import Store, open_store

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0
DATABASE_RETRY_SECONDS = 5.0


class Worker:
    """A stage service: consumes its queue and runs its handler."""

    def __init__(
        self,
        service: str,
        handler: Handler,
        *,
        settings: Settings,
        bus: Bus,
        store: Store,
        jobs: JobRecords | None = None,
        leased: bool = False,
    ) -> None:
        self.leased = leased
        self.service, self.handler, self.settings, self.bus = service, handler, settings, bus
        self.stop = threading.Event()
        jobs = jobs or JobRecords(
            store, open_ledger(settings), patience=settings.database_patience_seconds
        )
        self.ctx = StageContext(store=store, jobs=jobs, settings=settings, stop=self.stop)

    def on_message(self, body: Any, message: Any) -> None:
        """Handle one delivery and ack it once everything it caused is stored.

        A leased service (every stage service) acks as soon as it holds the stage's lease:
        from then on the lease and the reconciler, not the broker, keep the command. On
        SQS every worker keeps its message in flight instead, extending its visibility, and
        acks at the end (the trainer queue's in-flight count is what scales the trainers).
        """
        try:
            command = self._parse(body)
        except MessageError as exc:
            log.error("dead-lettering a message: %s", exc)
            worker_metrics.DEAD_LETTERS.labels(self.service).inc()
            self.bus.dead_letter(
                body, routing_key=message.delivery_info.get("routing_key", ""), reason=str(exc)
            )
            message.ack()
            return
        attempt = int((message.headers or {}).get(ATTEMPT_HEADER, 1))
        context = log_context(
            job_id=command.job_id,
            stage=STAGE_OF_COMMAND[command.type],  # type: ignore[attr-defined]
            attempt=attempt,
            message_type=command.type,  # type: ignore[attr-defined]
        )
        try:
            with context, self._in_flight(message):
                if not self.leased:
                    self._process(command, attempt, body=body)
                else:
                    self._process_leased(command, attempt, body=body, message=message)
        except LedgerUnavailable as exc:
            # The job's record cannot be read or written: hand the command back (a leased
            # one that was acked comes back through its expired lease) and wait a while.
            log.error("%s: %s; the command goes back to the queue", command.job_id, exc)
            if not message.acknowledged:
                message.requeue()
            self.stop.wait(DATABASE_RETRY_SECONDS)
            return
        self._relay()
        if not message.acknowledged:
            message.ack()

    def _relay(self) -> None:
        """Publish what this delivery wrote to the outbox now; what fails to go out (the
        broker is down) stays there for the relay thread to send."""
        try:
            relay_once(self.ctx.jobs, self.bus)
        except Exception as exc:  # noqa: BLE001 - the outbox keeps it
            log.warning("outbox not relayed yet (%s); it is kept and sent later", exc)

    def _process_leased(self, command: Command, attempt: int, *, body: Any, message: Any) -> None:
        lease = self._lease(command, attempt)
        if not lease.acquire():
            log.info("%s is held by a live worker; dropping this delivery", command.job_id)
            return
        if not self.bus.holds_deliveries:
            message.ack()  # AMQP: the lease, not consumer_timeout, keeps the job from now on
        protect_task(True)  # on ECS, a scale-in must pick an idle trainer, not this one
        try:
            with LeaseKeeper(lease) as keeper:
                self.ctx.lease_lost = keeper.lost
                self._process(command, attempt, body=body)
            if not keeper.lost.is_set():
                lease.release()
        finally:
            protect_task(False)

    @contextlib.contextmanager
    def _in_flight(self, message: Any) -> Iterator[None]:
        """On SQS, keep the message invisible while it is worked on (extended every third
        of the visibility timeout), so a long stage is not delivered to a second worker."""
        if not self.bus.holds_deliveries:
            yield
            return
        every = self.settings.sqs_visibility_seconds / 3
        with Periodic("sqs visibility", every, lambda: self.bus.extend_delivery(message)):
            yield

    def _lease(self, command: Command, attempt: int) -> Lease:
        stage = STAGE_OF_COMMAND[command.type]  # type: ignore[attr-defined]
        return Lease(
            self.ctx.jobs.ledger,
            command.job_id,
            stage,
            owner=self.ctx.worker,
            ttl=self.settings.lease_seconds,
            command={"body": dump_message(command), "attempt": attempt},
        )

    def _process(self, command: Command, attempt: int, *, body: Any) -> None:
        final = attempt >= self.settings.max_attempts
        stage = STAGE_OF_COMMAND[command.type]  # type: ignore[attr-defined]
        done = self.ctx.jobs.outcome(command.job_id, stage)
        if done is not None:
            self._delivered_again(command, done)
            return
        failed = self.ctx.jobs.failure(command.job_id)
        if failed is not None:
            log.info(
                "%s failed at %s (%s); this delivery is not run: a retry starts it again",
                command.job_id,
                failed.stage,  # type: ignore[attr-defined]
                failed.error_type,  # type: ignore[attr-defined]
            )
            return
        deaths = self.ctx.jobs.deaths(command.job_id, stage)
        if deaths >= self.settings.max_attempts:
            event: Event | None = self._give_up(command, stage, deaths)
        else:
            self._count_start(command, stage, attempt)
            started = time.monotonic()
            try:
                event = run_stage(
                    command,
                    self.handler,
                    self.ctx,
                    attempt=attempt,
                    final_attempt=final,
                    dispatch=True,
                )
            except Interrupted as exc:
                self._count_end(stage, "interrupted", started)
                if self.ctx.lease_lost.is_set():
                    log.warning("%s: lease lost; another worker owns the job", command.job_id)
                    return
                log.warning("requeuing %s: %s", command.job_id, exc)
                self.ctx.jobs.record(
                    StageProgress(
                        job_id=command.job_id,
                        stage=stage,
                        progress={"phase": f"interrupted ({exc}); sent again", "interrupted": True},
                    ),
                    send=[(command, {ATTEMPT_HEADER: attempt})],
                    again=True,
                )
                return
            self._count_end(stage, worker_metrics.outcome_of(event), started)
        if event is None:
            self.ctx.jobs.send(command.job_id, (command, {ATTEMPT_HEADER: attempt + 1}), again=True)
            return
        if isinstance(event, StageFailed) and not event.permanent:
            worker_metrics.DEAD_LETTERS.labels(self.service).inc()
            self._dead_letter(body, command, event.error)

    def _dead_letter(self, body: Any, command: Command, reason: str) -> None:
        """Keep the failed command for operators; the job's failure is recorded already, so
        a broker that cannot take it (a full disk, a dropped connection) costs the copy,
        never the worker."""
        try:
            self.bus.dead_letter(body, routing_key=command.routing_key, reason=reason)
        except Exception as exc:  # noqa: BLE001 - the job's own record has the failure
            log.error(
                "%s: dead letter not kept (%s); the job's failure is recorded", command.job_id, exc
            )

    @staticmethod
    def _count_start(command: Command, stage: str, attempt: int) -> None:
        """A run begins: its wait in the queue (a first attempt), or one more retry."""
        if attempt > 1:
            worker_metrics.RETRIES.labels(stage).inc()
            return
        waited = time.time() - command.created_at.timestamp()
        worker_metrics.QUEUE_WAIT.labels(stage).observe(max(waited, 0.0))

    @staticmethod
    def _count_end(stage: str, outcome: str, started: float) -> None:
        worker_metrics.STAGE_SECONDS.labels(stage, outcome).observe(time.monotonic() - started)
        if stage == "train":
            worker_metrics.EXAMPLES_PER_SECOND.set(0)

    def _delivered_again(self, command: Command, done: Event) -> None:
        """A command whose stage already succeeded (at-least-once delivery): nothing is run
        or recorded again; the next command is sent only if its stage never started (the
        worker that recorded the success may have died before sending it)."""
        log.info("%s: %s already recorded; duplicate delivery", command.job_id, done.type)
        following = next_command(command, done)
        if following is None:
            return
        if not self.ctx.jobs.started(command.job_id, STAGE_OF_COMMAND[following.type]):  # type: ignore[attr-defined]
            self.ctx.jobs.send(command.job_id, following)

    def _give_up(self, command: Command, stage: str, deaths: int) -> StageFailed:
        """A command whose workers keep dying (a crash loop): fail the job, not the fleet."""
        failed = StageFailed(
            job_id=command.job_id,
            stage=stage,
            error=f"the {stage} worker died {deaths} times while running this command "
            "(killed, out of memory or crashed on this input); not run again",
            error_type="WorkerDied",
            attempts=deaths,
            permanent=False,
        )
        log.error("%s: %s", command.job_id, failed.error)
        self.ctx.jobs.record(failed, send=[failed])
        end_run(self.ctx, command, "FAILED")
        return failed

    def _parse(self, body: Any) -> Command:
        message = parse_message(body)
        expected = SERVICE_COMMANDS[self.service]
        if not isinstance(message, Command) or message.type != expected:  # type: ignore[attr-defined]
            raise MessageError(f"{self.service} takes {expected}, got {type(message).__name__}")
        return message

    def heartbeat(self) -> None:
        """Touch this service's heartbeat file (read by health checks)."""
        path = heartbeat_path(self.settings, self.service)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{time.time()}\n")

    def run(self) -> None:
        """Declare the topology and consume until stopped."""
        self.bus.declare()
        self.heartbeat()
        beat = Periodic("heartbeat", HEARTBEAT_SECONDS, self.heartbeat)
        relay = Relay(self.ctx.jobs, self.bus)  # what another process left unsent
        log.info("%s ready on %s", self.service, self.settings.broker_url.split("@")[-1])
        with beat, relay:
            self.bus.consume(self.service, self.on_message, stop=self.stop, pull=self.leased)
        log.info("%s stopped", self.service)


def run_service(
    service: str, handler: Handler, argv: list[str] | None = None, *, leased: bool = False
) -> int:
    """Entry point of a stage service: ``--health`` checks, otherwise serve."""
    settings = Settings()
    argv = sys.argv[1:] if argv is None else argv
    if "--health" in argv:
        return 0 if check_health(settings, service) else 1
    configure_logging(service, level=settings.log_level, log_format=settings.log_format)
    worker_metrics.serve(settings.metrics_port)
    worker = Worker(
        service,
        handler,
        settings=settings,
        bus=Bus(settings),
        store=open_store(settings),
        leased=leased,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    end_with_launcher()
    worker.run()
    return 0
