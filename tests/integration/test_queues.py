"""termtune's queues on a real RabbitMQ node: quorum queues whose broker dead-letters a
message redelivered past the delivery limit (a message that kills its worker every time)."""

from __future__ import annotations

import uuid

from shared.bus import Bus
from shared.messages import PrepareDataset, parse_message
from shared.settings import Settings
from tests.integration.conftest import RABBITMQ_PASSWORD, RABBITMQ_USER


def test_a_message_redelivered_past_the_limit_is_dead_lettered_by_the_broker(rabbitmq, tmp_path):
    settings = Settings(
        var_dir=tmp_path,
        broker_url=f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@{rabbitmq}//",
        exchange=f"quorum-{uuid.uuid4().hex[:8]}",
        amqp_delivery_limit=2,
    )
    bus = Bus(settings)
    bus.declare()
    bus.publish(PrepareDataset(job_id="poison", spec_uri="file:///nowhere.yaml"))
    deliveries = 0
    with bus.connect() as conn:
        queue = bus.queues["dataprep"](conn.default_channel)
        while (message := queue.get(no_ack=False)) is not None:
            deliveries += 1  # a worker that takes it and dies: returned to the queue
            message.reject(requeue=True)
            assert deliveries < 10, "the broker never gave up on the message"
        dead = bus.dead_queue(conn.default_channel).get(no_ack=True)
    assert deliveries == 3  # the first delivery and two redeliveries
    assert dead is not None
    assert parse_message(dead.payload).job_id == "poison"
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
