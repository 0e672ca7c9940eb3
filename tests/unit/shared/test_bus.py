"""The embedded (folder) broker."""

from shared.bus import Bus
from shared.messages import PrepareDataset, parse_message
from shared.settings import Settings


def _received(bus: Bus, service: str) -> list[str]:
    """The job ids of the commands waiting on a service's queue (taken off it)."""
    got = []
    with bus.connect() as conn:
        bound = bus.queues[service].bind(conn.default_channel)
        while (message := bound.get(no_ack=True, accept=["json"])) is not None:
            got.append(parse_message(message.decode()).job_id)
    return got


def test_two_folder_brokers_in_one_process_each_route_their_own_messages(tmp_path):
    # kombu keeps the folder transport's bindings class-wide: the second folder's binding
    # was skipped and every message published to it dropped for want of a route.
    buses = [Bus(Settings(var_dir=tmp_path / name)) for name in ("first", "second")]
    for bus in buses:
        bus.declare()
    for n, bus in enumerate(buses):
        bus.publish(PrepareDataset(job_id=f"job-{n}", spec_uri="file:///spec.json"))
    try:
        assert [_received(bus, "dataprep") for bus in buses] == [["job-0"], ["job-1"]]
        for bus in buses:
            control = bus.settings.broker_dir / "control"
            assert (control / "termtune.exchange").is_file()
    finally:
        for bus in buses:
            bus.close()


def test_a_reader_never_takes_a_message_half_written_and_skips_a_cut_one(tmp_path):
    import threading

    bus = Bus(Settings(var_dir=tmp_path))
    bus.declare()
    messages = bus.settings.broker_dir / "messages"
    # a file left cut short (a crash, a full disk) before the good messages: skipped
    (messages / "0_cut.termtune.dataprep.msg").write_bytes(b'{"body": "eyJ')
    big = "x" * 400_000  # a long write widens the window a reader could take it in
    sent = [f"job-{n}" for n in range(40)]

    def publish() -> None:
        for job_id in sent:
            bus.publish(PrepareDataset(job_id=job_id, spec_uri=f"file:///{big}.json"))

    writer = threading.Thread(target=publish)
    writer.start()
    got: list[str] = []
    try:
        while writer.is_alive() or len(got) < len(sent):
            got += _received(bus, "dataprep")
            assert len(got) <= len(sent)
        writer.join()
        assert got == sent  # every message whole, in order, once
        assert not list(messages.glob("*.writing"))
    finally:
        writer.join()
        bus.close()


def test_rabbitmq_queues_are_quorum_queues_that_dead_letter_past_the_delivery_limit():
    bus = Bus(Settings(broker_url="amqp://u:p@rabbit:5672//", amqp_delivery_limit=7))
    assert bus.queues["trainer"].queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "termtune.dead",
    }
    assert bus.dead_queue.queue_arguments == {"x-queue-type": "quorum"}
    classic = Bus(Settings(broker_url="amqp://u:p@rabbit:5672//", amqp_queue_type="classic"))
    assert not classic.queues["trainer"].queue_arguments
    for url in ("filesystem://", "sqs://"):
        assert not Bus(Settings(broker_url=url)).queues["trainer"].queue_arguments
