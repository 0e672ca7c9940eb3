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
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import sqlalchemy as sa

from shared.jobs import JobRecords
from shared.ledger import tables as t
from shared.messages import parse_message
from shared.periodic import Periodic

log = logging.getLogger(__name__)
#: how long a claim lasts unless renewed (a dead relay's rows wait this long for another)
CLAIM_SECONDS = 60.0
BATCH = 100


def relay_once(jobs: JobRecords, bus: Any, *, batch: int = BATCH) -> int:
    """Publish every unsent message this relay can claim; how many were sent."""
    sent = 0
    while True:
        claim = secrets.token_hex(16)
        rows = _claim(jobs, claim, batch)
        if not rows:
            return sent
        done = _send_batch(jobs, bus, claim, rows)
        sent += done
        if done == len(rows) and len(rows) < batch:  # all sent, and no more to claim
            return sent


def _send_batch(jobs: JobRecords, bus: Any, claim: str, rows: list[Any]) -> int:
    """Publish a claimed batch in order, its claim kept alive meanwhile; how many were
    sent (fewer than the rows when the claim on the rest was lost to another relay). One
    transaction a message: it marks the one before sent and takes this one."""
    keeper = Periodic("outbox claim", CLAIM_SECONDS / 4, lambda: _renew(jobs, claim))
    sent, published = 0, None
    try:
        with keeper:
            for row in rows:
                if not _take(jobs, claim, row.id, published):
                    log.warning("outbox claim ran out at message %d: left to another relay", row.id)
                    return sent
                bus.publish(parse_message(row.body), headers=row.headers or {})
                published, sent = row.id, sent + 1
    finally:  # the last one marked sent; what is left unsent is free for the next pass
        _release(jobs, claim, published)
    return sent


def _claim(jobs: JobRecords, claim: str, batch: int) -> list[Any]:
    box, now = t.outbox.c, jobs.ledger.now
    free = sa.and_(
        box.sent_at.is_(None), sa.or_(box.claimed_until.is_(None), box.claimed_until < now)
    )
    oldest = sa.select(box.id).where(free).order_by(box.id).limit(batch)
    with jobs.ledger.write() as conn:
        conn.execute(
            t.outbox.update()
            .where(box.id.in_(oldest.scalar_subquery()), free)
            .values(claim=claim, claimed_until=now + CLAIM_SECONDS)
        )
        return list(
            conn.execute(
                sa.select(box.id, box.body, box.headers)
                .where(box.sent_at.is_(None), box.claim == claim)  # the (sent_at, id) index
                .order_by(box.id)
            )
        )


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
