"""The outbox relay: publishes the messages the ledger committed, then marks them sent.

A process that writes to the outbox (the API, every worker) runs a relay. A relay claims a
batch of unsent rows for a while (one conditional UPDATE, so two relays do not take the
same rows), publishes them in order and marks each sent. A broker outage leaves the rest
unsent and unclaimed, for the next pass; a relay that dies after publishing and before
marking lets another publish again once the claim runs out (a duplicate, which stages
absorb: they are idempotent).
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
CLAIM_SECONDS = 60.0
BATCH = 100


def relay_once(jobs: JobRecords, bus: Any, *, batch: int = BATCH) -> int:
    """Publish every unsent message this relay can claim; how many were sent."""
    sent = 0
    while True:
        rows = _claim(jobs, batch)
        if not rows:
            return sent
        for n, row in enumerate(rows):
            try:
                bus.publish(parse_message(row.body), headers=row.headers or {})
            except Exception:
                _release(jobs, [r.id for r in rows[n:]])
                raise
            with jobs.ledger.write() as conn:
                conn.execute(
                    t.outbox.update().where(t.outbox.c.id == row.id).values(sent_at=jobs.ledger.now)
                )
            sent += 1
        if len(rows) < batch:
            return sent


def _claim(jobs: JobRecords, batch: int) -> list[Any]:
    box, now = t.outbox.c, jobs.ledger.now
    claim = secrets.token_hex(16)
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
                sa.select(box.id, box.body, box.headers).where(box.claim == claim).order_by(box.id)
            )
        )


def _release(jobs: JobRecords, ids: list[int]) -> None:
    with jobs.ledger.write() as conn:
        conn.execute(t.outbox.update().where(t.outbox.c.id.in_(ids)).values(claimed_until=None))


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
