"""kombu topology, publishing and consuming.

One durable topic exchange; each worker owns a durable queue bound to its command's
routing key (``cmd.TrainModel``); events go out as ``event.<Type>``. Messages are JSON
only, persistent, published with retries (and confirms on AMQP). A worker acks only after
its handler's outputs are stored. Poison messages go to the dead-letter exchange with the
reason in their headers, where the ``<exchange>.dead`` queue keeps them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu import Connection, Exchange, Queue, pools
from kombu.exceptions import ChannelError
from kombu.message import Message as KombuMessage
from kombu.transport import filesystem, virtual
from kombu.utils import json as kombu_json

from shared.messages import Message, dump_message
from shared.settings import Settings

log = logging.getLogger(__name__)

#: service name → the command its queue receives
SERVICE_COMMANDS: dict[str, str] = {
    "dataprep": "PrepareDataset",
    "trainer": "TrainModel",
    "evaluator": "EvaluateModel",
    "publisher": "PublishModel",
}
ATTEMPT_HEADER = "x-termtune-attempt"
REASON_HEADER = "x-termtune-dead-reason"
FILESYSTEM_POLL_SECONDS = 0.05
RECONNECT_SECONDS = 1.0
#: publishing rides out a broker restart (about 20 s of retries)
RETRY_POLICY = {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}
RECONNECT_WINDOW_SECONDS = 20.0

OnMessage = Callable[[dict[str, Any], KombuMessage], None]


class _FolderChannel(filesystem.Channel):
    """kombu's folder channel, with each message whole before any reader can take it.

    kombu writes a message file in place, and a reader takes a file by moving it: one that
    moves it while it is being written reads it empty or cut short (a JSONDecodeError that
    killed a worker under a burst of submissions). Here a message is written under a name
    no reader takes, then renamed into place; a file that still cannot be read (left cut
    short by a crash or a full disk) is reported and skipped, never a crash.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".writing"  # not "<queue>.msg": no reader takes it
        try:
            with open(partial, "wb") as fh:
                fh.write(kombu_json.dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"cannot add a message file to {self.data_folder_out}") from exc

    def _get(self, queue: str) -> Any:
        while True:  # each failed read has removed its file: this ends with Empty
            try:
                return super()._get(queue)
            except ValueError as exc:
                log.error("skipped an unreadable message file of queue %s: %s", queue, exc)


class FolderTransport(filesystem.Transport):
    """kombu's folder broker with its bindings kept per control folder.

    kombu keeps the filesystem transport's exchange and binding state in one class-wide
    object: once a process has bound ``termtune.dataprep`` for one folder, binding it for
    another folder is skipped, nothing is written to that folder's control files, and
    every message published there is dropped for want of a route. A process that opens
    two embedded brokers (the tests, a second job folder) needs the state per folder.
    """

    Channel = _FolderChannel
    _states: dict[str, virtual.BrokerState] = {}
    _states_lock = threading.Lock()

    def __init__(self, client: Connection, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = str(client.transport_options.get("control_folder", "control"))
        with self._states_lock:
            self.state = self._states.setdefault(folder, virtual.BrokerState())


class Bus:
    """The message bus of one process: topology, publish, consume."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        prefix = settings.exchange
        self.exchange = Exchange(prefix, type="topic", durable=True)
        self.dead_exchange = Exchange(f"{prefix}.dead", type="topic", durable=True)
        arguments = self._queue_arguments()
        self.queues = {
            service: Queue(
                f"{prefix}.{service}",
                self.exchange,
                routing_key=f"cmd.{command}",
                durable=True,
                queue_arguments={**arguments, **self._dead_lettering()},
            )
            for service, command in SERVICE_COMMANDS.items()
        }
        self.dead_queue = Queue(
            f"{prefix}.dead",
            self.dead_exchange,
            routing_key="#",
            durable=True,
            queue_arguments=arguments,
        )
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def _on_rabbitmq_quorum(self) -> bool:
        return (
            self.settings.broker_url.startswith(("amqp", "pyamqp"))
            and self.settings.amqp_queue_type == "quorum"
        )

    def _queue_arguments(self) -> dict[str, Any]:
        """RabbitMQ: quorum queues (replicated, the type RabbitMQ 4 recommends for durable
        work queues); other brokers take their queues as they are."""
        return {"x-queue-type": "quorum"} if self._on_rabbitmq_quorum() else {}

    def _dead_lettering(self) -> dict[str, Any]:
        """A stage queue's message redelivered past the limit goes, by the broker's hand, to
        the dead-letter exchange: a message that kills its worker every time, before the
        worker counts an attempt, ends there instead of looping."""
        if not self._on_rabbitmq_quorum():
            return {}
        return {
            "x-delivery-limit": self.settings.amqp_delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange.name,
        }

    def connect(self) -> Connection:
        """A new connection to the broker, with the transport's options."""
        url = self.settings.broker_url
        return Connection(
            url,
            transport=FolderTransport if url.startswith("filesystem") else None,
            transport_options=self._transport_options(),
        )

    def _transport_options(self) -> dict[str, Any]:
        url = self.settings.broker_url
        if url.startswith("filesystem"):
            folder = self.settings.broker_dir
            (folder / "messages").mkdir(parents=True, exist_ok=True)
            (folder / "control").mkdir(parents=True, exist_ok=True)
            return {
                "data_folder_in": str(folder / "messages"),
                "data_folder_out": str(folder / "messages"),
                "control_folder": str(folder / "control"),
                "polling_interval": self.idle_wait,
            }
        if url.startswith(("amqp", "pyamqp")):
            # A channel opened while the broker is away (a publish during a restart)
            # retries for as long as the publish itself, not kombu's 5 s default.
            return {
                "confirm_publish": True,
                "connect_retries_timeout": RECONNECT_WINDOW_SECONDS,
                **{k: v for k, v in RETRY_POLICY.items() if k.startswith("interval")},
            }
        if url.startswith("sqs"):
            # Queues are looked up before any is created: a deployment's pre-made queues
            # (with their dead-letter redrive) are used as they are.
            return {
                "region": self.settings.sqs_region
                or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                "visibility_timeout": self.settings.sqs_visibility_seconds,
                "wait_time_seconds": 5,
                "polling_interval": self.settings.poll_seconds,
                "is_secure": self.settings.sqs_is_secure,
            }
        return {}

    @property
    def idle_wait(self) -> float:
        """Seconds an idle worker waits before looking for a message again.

        The embedded broker is a folder: listing it costs nothing, and its poll is the
        latency of every hop between stages, so it is looked at every 50 ms at most.
        """
        if self.settings.broker_url.startswith("filesystem"):
            return min(self.settings.poll_seconds, FILESYSTEM_POLL_SECONDS)
        return self.settings.poll_seconds

    @property
    def holds_deliveries(self) -> bool:
        """Whether a leased worker keeps its delivery in flight while it works (SQS).

        On SQS the in-flight count is what scales trainers, and the visibility timeout can
        be extended; on AMQP a delivery unacked past ``consumer_timeout`` is redelivered,
        so a leased worker acks as soon as it holds the lease.
        """
        return self.settings.broker_url.startswith("sqs")

    def extend_delivery(self, message: KombuMessage) -> None:
        """Keep an SQS message invisible for another visibility timeout."""
        info = message.delivery_info
        message.channel.sqs().change_message_visibility(
            QueueUrl=info["sqs_queue"],
            ReceiptHandle=info["sqs_message"]["ReceiptHandle"],
            VisibilityTimeout=self.settings.sqs_visibility_seconds,
        )

    @property
    def connection(self) -> Connection:
        """The process's shared publishing connection (opened on first use)."""
        with self._lock:
            if self._connection is None:
                self._connection = self.connect()
            return self._connection

    def declare(self) -> None:
        """Declare every exchange and queue, so nothing published is dropped."""
        with self.connect() as conn:
            conn.ensure_connection(max_retries=10, interval_start=0.5, interval_max=3)
            channel = conn.default_channel
            for queue in [*self.queues.values(), self.dead_queue]:
                queue.bind(channel).declare()

    def publish(self, message: Message, *, headers: dict[str, Any] | None = None) -> None:
        """Publish a command or event, persistent, retried on connection errors."""
        self._publish(
            dump_message(message),
            exchange=self.exchange,
            routing_key=message.routing_key,
            headers=headers or {},
        )

    def dead_letter(self, body: Any, *, routing_key: str, reason: str) -> None:
        """Keep a message that cannot be processed, with the reason, on the dead queue."""
        self._publish(
            body,
            exchange=self.dead_exchange,
            routing_key=routing_key or "unknown",
            headers={REASON_HEADER: reason[:1000]},
        )

    def _publish(
        self, body: Any, *, exchange: Exchange, routing_key: str, headers: dict[str, Any]
    ) -> None:
        with pools.producers[self.connection].acquire(block=True, timeout=30) as producer:
            producer.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                serializer="json",
                delivery_mode=2,
                headers=headers,
                retry=True,
                retry_policy=RETRY_POLICY,
                declare=[exchange, *self.queues.values(), self.dead_queue],
            )

    def consume(
        self, service: str, on_message: OnMessage, *, stop: threading.Event, pull: bool = False
    ) -> None:
        """Deliver the service's commands one at a time until ``stop`` is set.

        ``pull`` fetches a message only when idle (basic.get) instead of subscribing: a
        worker that acks early (the trainer, once it holds the job's lease) must not have
        the broker push it the next job while it is still busy with this one.
        """
        while not stop.is_set():
            conn = self.connect()
            errors = (*conn.connection_errors, *conn.channel_errors, OSError)
            try:
                self._consume(conn, service, on_message, stop=stop, pull=pull)
            except errors as exc:
                # The broker went away (restart, failover): the delivery in hand was not
                # acked and comes back; reconnect instead of letting the process die.
                log.warning("broker connection lost (%s); reconnecting", exc)
                stop.wait(RECONNECT_SECONDS)
            finally:
                conn.release()

    def _consume(
        self,
        conn: Connection,
        service: str,
        on_message: OnMessage,
        *,
        stop: threading.Event,
        pull: bool,
    ) -> None:
        queue = self.queues[service]
        conn.ensure_connection(max_retries=30, interval_start=0.5, interval_max=5)
        if pull:
            self._pull(conn, queue, on_message, stop=stop)
            return
        with conn.Consumer([queue], callbacks=[on_message], accept=["json"], prefetch_count=1):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=self.settings.poll_seconds)
                except TimeoutError:
                    continue

    def _pull(
        self, conn: Connection, queue: Queue, on_message: OnMessage, *, stop: threading.Event
    ) -> None:
        bound = queue.bind(conn.default_channel)
        while not stop.is_set():
            message = bound.get(no_ack=False, accept=["json"])
            if message is None:
                stop.wait(self.idle_wait)
                continue
            on_message(message.decode(), message)

    def close(self) -> None:
        """Release the publishing connection."""
        with self._lock:
            if self._connection is not None:
                self._connection.release()
                self._connection = None
