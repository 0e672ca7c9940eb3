"""The outbox relay under a slow broker: a claim never runs out while its batch is sent,
and a relay never publishes a message whose claim another relay took; and with a message
it cannot read (a newer version's): the row is parked, its job's later messages wait
behind it, and every other job's messages are sent."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import sqlalchemy as sa

from shared import outbox
from shared.jobspec import JobSpec
from shared.ledger import tables as t
from shared.messages import StageProgress, TrainModel, dump_message
from shared.outbox import pending, relay_once
from tests.factories import make_ctx


@pytest.fixture
def jobs(tmp_path):
    jobs = make_ctx(tmp_path / "var").jobs
    jobs.create("job-1", JobSpec(name="job"))
    return jobs


def _write(jobs, count, *, job_id="job-1", first=0):
    """``count`` messages of ``job_id`` in the outbox, numbered by their ``n`` header from
    ``first``."""
    command = _command(job_id)
    for n in range(first, first + count):
        jobs.record(
            StageProgress(job_id=job_id, stage="train", progress={"n": n}),
            send=[(command, {"n": n})],
        )


def _command(job_id):
    return TrainModel(job_id=job_id, spec_uri="file:///s", dataset_manifest="file:///m")


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


def _write_unreadable(jobs, n, *, job_id="job-1", body=None):
    """A message numbered ``n`` that this version cannot read (by default a type a newer
    version added), written as the ledger writes the outbox; its row id."""
    body = body or {"type": "NoSuchMessage", "job_id": job_id, "schema_version": 1}
    with jobs.ledger.write() as conn:
        row = conn.execute(
            t.outbox.insert().values(
                job_id=job_id, body=body, headers={"n": n}, created_at=jobs.ledger.clock(conn)
            )
        )
        return row.inserted_primary_key[0]


def _park_ends(jobs):
    """PARK_SECONDS pass: every parked row's claim runs out."""
    box = t.outbox.c
    with jobs.ledger.write() as conn:
        conn.execute(
            t.outbox.update()
            .where(box.sent_at.is_(None), box.claim.startswith("parked:"))
            .values(claimed_until=jobs.ledger.now - 1)
        )


def _readable(jobs, row_id):
    """Row ``row_id`` as a relay of the newer version reads it (a message it knows)."""
    with jobs.ledger.write() as conn:
        conn.execute(
            t.outbox.update()
            .where(t.outbox.c.id == row_id)
            .values(body=dump_message(_command("job-1")))
        )


def _parked_for(jobs, row_id):
    """How many seconds row ``row_id`` is still claimed for."""
    with jobs.ledger.read() as conn:
        until = conn.execute(sa.select(t.outbox.c.claimed_until).where(t.outbox.c.id == row_id))
        return until.scalar_one() - jobs.ledger.clock(conn)


def _claims(jobs):
    """The unsent rows' claims, by row id."""
    box = t.outbox.c
    with jobs.ledger.read() as conn:
        rows = conn.execute(sa.select(box.id, box.claim).where(box.sent_at.is_(None)))
        return dict(rows.all())


@pytest.fixture
def two_jobs(jobs):
    jobs.create("job-2", JobSpec(name="other"))
    return jobs


@pytest.mark.timeout(60)  # a relay that re-claims what it parked never returns
def test_an_unreadable_message_is_parked_and_other_jobs_messages_are_sent(two_jobs, caplog):
    """A message of job 1 that this version cannot read used to stop every relay pass at
    it (the oldest row, claimed first each time): job 2's later messages are sent now, and
    the row waits, not claimed by the next passes, until its park ends."""
    jobs = two_jobs
    bad = _write_unreadable(jobs, -1)
    _write(jobs, 3, job_id="job-2")
    bus = SlowBus()
    assert relay_once(jobs, bus) == 3
    assert bus.sent == [0, 1, 2] and pending(jobs) == 1
    parked = _claims(jobs)[bad]
    assert parked.startswith("parked:")
    assert outbox.PARK_SECONDS - 10 < _parked_for(jobs, bad) <= outbox.PARK_SECONDS
    caplog.clear()
    assert relay_once(jobs, bus) == 0  # the next pass leaves it alone, quietly
    assert _claims(jobs)[bad] == parked and caplog.records == []
    _park_ends(jobs)
    assert relay_once(jobs, bus) == 0  # tried again: still unreadable here, parked anew
    assert _claims(jobs)[bad] not in (parked, None)
    _park_ends(jobs)
    _readable(jobs, bad)
    assert relay_once(jobs, bus) == 1  # a relay that can read it sends it
    assert bus.sent == [0, 1, 2, -1] and pending(jobs) == 0


def test_a_jobs_later_messages_wait_behind_its_unreadable_one(two_jobs, caplog):
    """Job 1's messages after its unreadable one are not sent before it (they would arrive
    before the message they follow): held in its batch, and not claimed by later passes
    while it is parked; job 2's are sent. Once a relay can read it, all go in order."""
    jobs = two_jobs
    caplog.set_level(logging.WARNING, logger="shared.outbox")
    _write(jobs, 1)
    bad = _write_unreadable(jobs, -1)
    _write(jobs, 2, first=1)
    _write(jobs, 1, job_id="job-2", first=10)
    bus = SlowBus()
    assert relay_once(jobs, bus) == 2
    assert bus.sent == [0, 10] and pending(jobs) == 3
    held = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(held) == 2 and all(f"held behind its unreadable message {bad}" in m for m in held)
    _write(jobs, 1, first=3)  # written after the park: waits too
    _write(jobs, 1, job_id="job-2", first=11)
    assert relay_once(jobs, bus) == 1
    assert bus.sent == [0, 10, 11] and pending(jobs) == 4
    _park_ends(jobs)
    _readable(jobs, bad)
    assert relay_once(jobs, bus) == 4
    assert bus.sent == [0, 10, 11, -1, 1, 2, 3] and pending(jobs) == 0


@pytest.mark.timeout(60)  # a relay that re-claims what it parked never returns
def test_a_relay_pass_ends_when_its_first_batches_are_unreadable(two_jobs, monkeypatch):
    """Four unreadable rows (of four jobs), then five good ones of another job, in batches
    of three: one relay_once sends all five (parked rows count as dealt with, so a full
    batch of them does not end the pass) and then stops: four claims, the last finding
    nothing."""
    jobs = two_jobs
    claims = []
    claim = outbox._claim
    monkeypatch.setattr(outbox, "_claim", lambda *a: claims.append(1) or claim(*a))
    for n in range(4):
        _write_unreadable(jobs, -1 - n, job_id=f"old-{n}")
    _write(jobs, 5, job_id="job-2")
    bus = SlowBus()
    assert relay_once(jobs, bus, batch=3) == 5
    assert bus.sent == [0, 1, 2, 3, 4] and pending(jobs) == 4
    assert len(claims) == 4  # [-1 -2 -3] [-4 0 1] [2 3 4] []
    _write_unreadable(jobs, -5, job_id="old-4")
    _write(jobs, 1, job_id="job-2", first=5)
    assert relay_once(jobs, bus, batch=3) == 1  # [-5 5]: a short batch, all dealt with
    assert bus.sent[-1] == 5 and len(claims) == 5 and pending(jobs) == 5


def test_an_unreadable_message_is_logged_once_naming_row_job_and_problem(jobs, caplog):
    """One ERROR line a process for an unreadable row, however often it is tried: its row
    id, its job and what does not parse (here a field this version requires and a newer
    one dropped)."""
    caplog.set_level(logging.WARNING, logger="shared.outbox")
    body = {"type": "TrainModel", "job_id": "job-1", "schema_version": 1}
    bad = _write_unreadable(jobs, -1, body=body)
    for _ in range(3):
        relay_once(jobs, SlowBus())
        _park_ends(jobs)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and caplog.records[0].levelno == logging.ERROR
    assert f"outbox message {bad} of job job-1 cannot be read" in errors[0]
    assert "spec_uri: Field required" in errors[0] and "\n" not in errors[0]
    assert pending(jobs) == 1
