"""The outbox relay: publishes the messages the ledger committed, then marks them sent.

A process that writes to the outbox (the API, every worker) runs a relay. A relay claims a
batch of unsent rows for a while (one conditional UPDATE, so two relays do not take the
same rows), publishes them in order and marks each sent. The claim is renewed while the
batch is sent, by a background keeper and again before each message, so a slow broker
(kombu retries a publish for many seconds) does not let it run out while the renewals
reach the database; and a relay publishes a message only after that renewal found the row
still its own, so a relay whose claim did run out stops rather than sending what another
relay took. Delivery is at least once: a relay that dies after publishing and before
marking, or whose renewals failed for a whole claim during one publish, lets another
publish the message again (a duplicate, which stages absorb: they are idempotent). A
broker outage leaves the rest unsent and unclaimed, for the next pass.

A row this code cannot read (a message type or field that a newer version wrote during a
rolling deploy) is not published and does not stop the batch: it is parked, its claim set
aside for PARK_SECONDS under a token no relay holds (the keeper does not renew it, the
release does not free it), so the passes meanwhile take newer rows; then any relay, perhaps
one that can read it, tries it again. Each process logs it once, at ERROR. The later rows
of its job wait with it, parked as long when in its batch and left unclaimed behind it
otherwise, so a job's messages are never published out of order around it; other jobs'
messages go on. A row no running version can read holds its job back until one can, or an
operator marks it sent.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from shared.errors import MessageError
from shared.jobs import JobRecords
from shared.ledger import tables as t
from shared.messages import parse_message
from shared.periodic import Periodic

log = logging.getLogger(__name__)
#: how long a claim lasts unless renewed (a dead relay's rows wait this long for another)
CLAIM_SECONDS = 60.0
#: how long an unreadable row (and its job's later rows) waits before a relay tries it again
PARK_SECONDS = 30.0
BATCH = 100
#: a parked row's claim: this prefix and the parking relay's token
_PARKED = "parked:"
#: (database, row id) of the rows this process has logged as set aside
_reported: set[tuple[str, int]] = set()
_reporting = threading.Lock()


@dataclass
class _Parked:
    """An unreadable row of a batch: its job's later rows wait behind it as long."""

    row_id: int
    until: float


@dataclass
class _Batch:
    """What a relay has done with its claimed batch so far."""

    sent: int = 0
    parked: int = 0
    #: the row published last, not yet marked sent
    published: int | None = None
    #: job id -> its unreadable row in this batch
    blocked: dict[str, _Parked] = field(default_factory=dict)


def relay_once(jobs: JobRecords, bus: Any, *, batch: int = BATCH) -> int:
    """Publish every unsent message this relay can claim; how many were sent."""
    sent = 0
    while True:
        claim = secrets.token_hex(16)
        rows = _claim(jobs, claim, batch)
        if not rows:
            return sent
        done = _send_batch(jobs, bus, claim, rows)
        sent += done.sent
        # parked rows are dealt with (no pass claims them for a while); a full batch may
        # have more behind it, and rows lost to a run-out claim may be free again
        if done.sent + done.parked == len(rows) and len(rows) < batch:
            return sent


def _send_batch(jobs: JobRecords, bus: Any, claim: str, rows: list[Any]) -> _Batch:
    """Publish a claimed batch in order, its claim kept alive meanwhile, parking what cannot
    be read (fewer sent and parked than the rows when the claim on the rest was lost to
    another relay). One transaction a message: it marks the one before sent and takes or
    parks this one."""
    keeper = Periodic("outbox claim", CLAIM_SECONDS / 4, lambda: _renew(jobs, claim))
    done = _Batch()
    try:
        with keeper:
            for row in rows:
                if not _send_one(jobs, bus, claim, row, done):
                    log.warning("outbox claim ran out at message %d: left to another relay", row.id)
                    break
    finally:  # the last one marked sent; what is left of the claim is free for the next pass
        _release(jobs, claim, done.published)
    return done


def _send_one(jobs: JobRecords, bus: Any, claim: str, row: Any, done: _Batch) -> bool:
    """Publish ``row``, or park it when it (or its job's earlier row in the batch) cannot
    be read; whether the claim still held it."""
    behind = done.blocked.get(row.job_id)
    message = None if behind else _parse(jobs, row)
    if message is None:
        return _set_aside(jobs, claim, row, done, behind)
    if not _take(jobs, claim, row.id, done.published):
        return False
    bus.publish(message, headers=row.headers or {})
    done.published, done.sent = row.id, done.sent + 1
    return True


def _parse(jobs: JobRecords, row: Any) -> Any:
    """The row's message, or None (logged once) when this code cannot read it."""
    try:
        return parse_message(row.body)
    except MessageError as exc:
        _report(
            jobs,
            row.id,
            logging.ERROR,
            "outbox message %d of job %s cannot be read here; parked for %.0fs for a relay "
            "that can, with its job's later messages: %s",
            row.id,
            row.job_id,
            PARK_SECONDS,
            exc,
        )
        return None


def _set_aside(
    jobs: JobRecords, claim: str, row: Any, done: _Batch, behind: _Parked | None
) -> bool:
    """Park ``row``: unreadable, or ``behind`` its job's unreadable row (then as long);
    whether the claim still held it."""
    until = _park(jobs, claim, row.id, done.published, behind.until if behind else None)
    if until is None:
        return False
    if behind is None:
        done.blocked[row.job_id] = _Parked(row.id, until)
    else:
        _report(
            jobs,
            row.id,
            logging.WARNING,
            "outbox message %d of job %s held behind its unreadable message %d",
            row.id,
            row.job_id,
            behind.row_id,
        )
    done.published, done.parked = None, done.parked + 1
    return True


def _report(jobs: JobRecords, row_id: int, level: int, msg: str, *args: Any) -> None:
    """Log ``msg`` the first time this process sets row ``row_id`` aside (a relay passes
    every few seconds; a parked row is tried again every PARK_SECONDS)."""
    key = (jobs.ledger.where, row_id)
    with _reporting:
        if key in _reported:
            return
        _reported.add(key)
    log.log(level, msg, *args)


def _claim(jobs: JobRecords, claim: str, batch: int) -> list[Any]:
    box, now = t.outbox.c, jobs.ledger.now
    with jobs.ledger.write() as conn:
        free = sa.and_(
            box.sent_at.is_(None),
            sa.or_(box.claimed_until.is_(None), box.claimed_until < now),
            *_behind_parked(conn, now),
        )
        oldest = sa.select(box.id).where(free).order_by(box.id).limit(batch)
        conn.execute(
            t.outbox.update()
            .where(box.id.in_(oldest.scalar_subquery()), free)
            .values(claim=claim, claimed_until=now + CLAIM_SECONDS)
        )
        return list(
            conn.execute(
                sa.select(box.id, box.job_id, box.body, box.headers)
                .where(box.sent_at.is_(None), box.claim == claim)  # the (sent_at, id) index
                .order_by(box.id)
            )
        )


def _behind_parked(conn: sa.Connection, now: Any) -> list[Any]:
    """Conditions that leave out the rows behind a parked row of their job (they wait for
    it, so a job's messages keep their order): one look at the unsent rows (the (sent_at,
    id) index) for the jobs with a parked row, nearly always none, rather than a look a
    candidate row."""
    box = t.outbox.c
    parked = conn.execute(
        sa.select(box.job_id, sa.func.min(box.id))
        .where(box.sent_at.is_(None), box.claim.startswith(_PARKED), box.claimed_until >= now)
        .group_by(box.job_id)
    )
    return [sa.not_(sa.and_(box.job_id == job_id, box.id > first)) for job_id, first in parked]


def _held(claim: str) -> Any:
    """The unsent rows of ``claim``: another relay's claim replaces the token, so a row
    that still has it was taken by no one else, even if its time ran out."""
    return sa.and_(t.outbox.c.claim == claim, t.outbox.c.sent_at.is_(None))


def _renew(jobs: JobRecords, claim: str) -> None:
    """The keeper's renewal: the claim's unsent rows held CLAIM_SECONDS from now, locked in
    id order as ``_take`` locks them (on PostgreSQL an update in scan order could deadlock
    with it)."""
    box = t.outbox.c
    with jobs.ledger.write() as conn:
        rows = sa.select(box.id).where(_held(claim)).order_by(box.id).with_for_update()
        ids = list(conn.execute(rows).scalars())
        conn.execute(
            t.outbox.update()
            .where(box.id.in_(ids), _held(claim))
            .values(claimed_until=jobs.ledger.now + CLAIM_SECONDS)
        )


def _take(jobs: JobRecords, claim: str, row_id: int, published: int | None) -> bool:
    """Mark ``published`` sent and renew the claim on row ``row_id``; whether the claim
    still holds it (another relay's claim replaced the token if not)."""
    box = t.outbox.c
    with jobs.ledger.write() as conn:
        if published is not None:
            _mark_sent(conn, jobs, published)
        taken = conn.execute(
            t.outbox.update()
            .where(box.id == row_id, _held(claim))
            .values(claimed_until=jobs.ledger.now + CLAIM_SECONDS)
        )
        return taken.rowcount == 1


def _park(
    jobs: JobRecords, claim: str, row_id: int, published: int | None, until: float | None
) -> float | None:
    """Mark ``published`` sent and park row ``row_id`` until ``until`` (PARK_SECONDS from
    now if None) under a claim no relay holds, so neither the keeper renews it nor the
    release frees it; until when, or None if the claim no longer held it."""
    box = t.outbox.c
    with jobs.ledger.write() as conn:
        if published is not None:
            _mark_sent(conn, jobs, published)
        if until is None:
            until = jobs.ledger.clock(conn) + PARK_SECONDS
        parked = conn.execute(
            t.outbox.update()
            .where(box.id == row_id, _held(claim))
            .values(claim=_PARKED + claim, claimed_until=until)
        )
        return until if parked.rowcount == 1 else None


def _mark_sent(conn: sa.Connection, jobs: JobRecords, row_id: int) -> None:
    conn.execute(t.outbox.update().where(t.outbox.c.id == row_id).values(sent_at=jobs.ledger.now))


def _release(jobs: JobRecords, claim: str, published: int | None) -> None:
    """Mark ``published`` sent and give up what is left of the claim (another relay's rows
    are not touched)."""
    with jobs.ledger.write() as conn:
        if published is not None:
            _mark_sent(conn, jobs, published)
        conn.execute(t.outbox.update().where(_held(claim)).values(claim=None, claimed_until=None))


def pending(jobs: JobRecords) -> int:
    """Messages not sent yet."""
    with jobs.ledger.read() as conn:
        query = sa.select(sa.func.count()).where(t.outbox.c.sent_at.is_(None))
        return int(conn.execute(query).scalar_one())


class Relay(Periodic):
    """relay_once every ``every`` seconds, and at once after each outbox write (the job
    records' ``on_outbox`` hook is pointed here)."""

    def __init__(self, jobs: JobRecords, bus: Any, *, every: float = 2.0) -> None:
        super().__init__("outbox relay", every, lambda: relay_once(jobs, bus))
        jobs.on_outbox = self.kick
