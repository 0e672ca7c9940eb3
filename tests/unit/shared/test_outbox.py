"""The outbox relay under a slow broker: a claim never runs out while its batch is sent,
and a relay never publishes a message whose claim another relay took."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from shared import outbox
from shared.jobspec import JobSpec
from shared.ledger import tables as t
from shared.messages import StageProgress, TrainModel
from shared.outbox import pending, relay_once
from tests.factories import make_ctx


@pytest.fixture
def jobs(tmp_path):
    jobs = make_ctx(tmp_path / "var").jobs
    jobs.create("job-1", JobSpec(name="job"))
    return jobs


def _write(jobs, count):
    """``count`` messages in the outbox, numbered by their ``n`` header."""
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    for n in range(count):
        jobs.record(
            StageProgress(job_id="job-1", stage="train", progress={"n": n}),
            send=[(command, {"n": n})],
        )


class SlowBus:
    """A broker that takes ``delay`` seconds a publish (kombu retrying a flaky connection)
    and calls ``during(n)`` while message ``n`` is being published."""

    def __init__(self, delay=0.0, during=None):
        self.delay, self.during, self.sent = delay, during, []

    def publish(self, message, headers=None):
        if self.during is not None:
            self.during(headers["n"])
        time.sleep(self.delay)
        self.sent.append(headers["n"])


def test_a_claim_outlives_publishes_slower_than_the_claim_itself(jobs, monkeypatch):
    """Each publish takes longer than a claim lasts; another relay polling meanwhile finds
    nothing to take (it used to take the batch once its claim ran out, and send it again)."""
    monkeypatch.setattr(outbox, "CLAIM_SECONDS", 3.0)
    _write(jobs, 2)
    other, done, busy = SlowBus(), threading.Event(), threading.Event()

    def poll():
        busy.wait()  # the slow relay holds the batch first
        while not done.is_set():
            relay_once(jobs, other)
            time.sleep(0.05)

    slow = SlowBus(delay=4.0, during=lambda n: busy.set())
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert relay_once(jobs, slow) == 2
    finally:
        done.set()
        poller.join()
    assert slow.sent == [0, 1] and other.sent == []
    assert pending(jobs) == 0


def _expire_after(jobs, n):
    """The claim on the messages after ``n`` runs out (its renewals held up)."""
    box = t.outbox.c
    with jobs.ledger.write() as conn:
        conn.execute(
            t.outbox.update()
            .where(box.sent_at.is_(None), box.id > _id_of(conn, n))
            .values(claimed_until=jobs.ledger.now - 1)
        )


def _id_of(conn, n):
    ids = conn.execute(sa.select(t.outbox.c.id).order_by(t.outbox.c.id)).scalars().all()
    return ids[n]


def test_a_relay_whose_claim_was_taken_stops_before_sending_the_rest(jobs):
    """While message 1 is being published the claim on the rest runs out and another relay
    takes and sends them: the first relay publishes none of them again."""
    _write(jobs, 6)
    other = SlowBus()

    def taken_over(n):
        if n == 1:
            _expire_after(jobs, 1)
            assert relay_once(jobs, other) == 4

    first = SlowBus(during=taken_over)
    assert relay_once(jobs, first) == 2
    assert first.sent == [0, 1] and other.sent == [2, 3, 4, 5]
    assert pending(jobs) == 0


def test_a_failed_relay_gives_back_only_what_it_still_holds(jobs):
    """The first relay's broker call fails after another relay took the rest of its batch
    (its claim ran out): it frees its own rows, not the other's, which a third relay would
    otherwise send a second time while the other is still sending them."""
    _write(jobs, 4)
    sending, go_on = threading.Event(), threading.Event()
    other = SlowBus(during=lambda n: (sending.set(), go_on.wait(10)))
    taker = threading.Thread(target=relay_once, args=(jobs, other))

    def broker_fails(n):
        _expire_after(jobs, 0)
        taker.start()
        assert sending.wait(10)  # the other relay holds messages 1..3 and is sending them
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        relay_once(jobs, SlowBus(during=broker_fails))
    third = SlowBus()
    relay_once(jobs, third)
    go_on.set()
    taker.join()
    assert third.sent == [0] and other.sent == [1, 2, 3]
    assert pending(jobs) == 0
