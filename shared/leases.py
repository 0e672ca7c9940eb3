"""Leases in the ledger: which worker owns a running stage, renewed by a heartbeat.

A lease is one row (job, stage) holding the owner, an expiry on the database's clock, a
version and the command being worked on. It is taken when absent or expired, and renewed,
by one conditional statement, so two workers never both believe they hold it. The
reconciler re-sends the command of a lease that expired (its worker died, even by
``kill -9``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from shared.ledger import Ledger
from shared.ledger import tables as t
from shared.periodic import Periodic

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One worker's claim on one stage of one job."""

    ledger: Ledger
    job_id: str
    stage: str
    owner: str
    ttl: float
    command: dict[str, Any] = field(default_factory=dict)
    version: int | None = None

    @property
    def key(self) -> str:
        """The lease's name in logs."""
        return f"{self.job_id}/{self.stage}"

    def _this(self) -> Any:
        return sa.and_(t.leases.c.job_id == self.job_id, t.leases.c.stage == self.stage)

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours."""
        try:
            return self._acquire()
        except sa.exc.IntegrityError:
            return False  # another worker inserted it first

    def _acquire(self) -> bool:
        leases, now = t.leases.c, self.ledger.now
        with self.ledger.write() as conn:
            taken = conn.execute(
                t.leases.update()
                .where(self._this(), sa.or_(leases.owner == self.owner, leases.expires_at <= now))
                .values(
                    owner=self.owner,
                    expires_at=now + self.ttl,
                    version=leases.version + 1,
                    command=self.command,
                    redispatched_for=None,
                )
                .returning(leases.version)
            ).first()
            if taken is None:
                held = conn.execute(sa.select(leases.owner).where(self._this())).first()
                if held is not None:
                    return False  # a live worker holds it
                conn.execute(
                    t.leases.insert().values(
                        job_id=self.job_id,
                        stage=self.stage,
                        owner=self.owner,
                        expires_at=now + self.ttl,
                        version=1,
                        command=self.command,
                    )
                )
                self.version = 1
                return True
            self.version = taken.version
            return True

    def renew(self) -> bool:
        """Extend the lease; False once it is lost: another worker took it, or the
        reconciler sent its command again. A lease that expired (a database hiccup longer
        than its time to live) but whose command was not sent again is still renewed."""
        leases = t.leases.c
        with self.ledger.write() as conn:
            renewed = conn.execute(
                t.leases.update()
                .where(
                    self._this(),
                    leases.owner == self.owner,
                    leases.version == self.version,
                    # re-sent: the new delivery must find the lease free, this worker stop
                    leases.redispatched_for.is_(None),
                )
                .values(expires_at=self.ledger.now + self.ttl, version=leases.version + 1)
                .returning(leases.version)
            ).first()
        if renewed is None:
            return False
        self.version = renewed.version
        return True

    def release(self) -> None:
        """Give the lease up if it is still ours."""
        with self.ledger.write() as conn:
            conn.execute(t.leases.delete().where(self._this(), t.leases.c.owner == self.owner))


class LeaseKeeper:
    """Renews a lease every third of its time to live; sets ``lost`` (and stops) when another
    worker holds it or its command was sent again. A renewal that fails (a database hiccup)
    is tried again next time."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self._timer = Periodic(f"lease {lease.key}", lease.ttl / 3, self._renew)

    def _renew(self) -> None:
        if not self.lease.renew():
            log.error("lease %s lost (taken over or its command sent again)", self.lease.key)
            self.lost.set()
            self._timer.stop()

    def __enter__(self) -> LeaseKeeper:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.stop()


@dataclass
class ExpiredLease:
    """A lease past its expiry whose command was not sent again yet."""

    job_id: str
    stage: str
    version: int
    command: dict[str, Any]


def expired_leases(ledger: Ledger, *, grace: float = 0.0) -> list[ExpiredLease]:
    """Every stage lease more than ``grace`` seconds past its expiry, not yet re-sent."""
    leases = t.leases.c
    query = sa.select(leases.job_id, leases.stage, leases.version, leases.command).where(
        leases.expires_at + grace <= ledger.now, leases.redispatched_for.is_(None)
    )
    with ledger.read() as conn:
        return [ExpiredLease(*row) for row in conn.execute(query)]


def delete_lease(conn: sa.Connection, lease: ExpiredLease) -> bool:
    """Drop a stale lease (its stage ended): False if it was renewed or taken meanwhile."""
    done = conn.execute(
        t.leases.delete().where(
            t.leases.c.job_id == lease.job_id,
            t.leases.c.stage == lease.stage,
            t.leases.c.version == lease.version,
        )
    )
    return done.rowcount == 1


def supersede(conn: sa.Connection, job_id: str, stages: set[str], ledger: Ledger) -> None:
    """A command for these stages of the job was written to the outbox (a stage handing its
    command back, a user's retry; the reconciler marks its own with mark_redispatched):
    the stage's lease, if one is held, is marked re-sent and expired in that same
    transaction. Its holder is finishing (ending a
    tracking run, dead-lettering) or gone; the new command's delivery must find the lease
    free, not be dropped as a duplicate while that holder still has it (then nothing
    would send it again)."""
    leases = t.leases.c
    conn.execute(
        t.leases.update()
        .where(leases.job_id == job_id, leases.stage.in_(sorted(stages)))
        .values(expires_at=ledger.now, redispatched_for=ledger.now)
    )


def mark_redispatched(conn: sa.Connection, lease: ExpiredLease, ledger: Ledger) -> bool:
    """Record that an expired lease's command was sent again (once per expiry): False if
    it was renewed, taken or re-sent by another replica meanwhile."""
    leases = t.leases.c
    done = conn.execute(
        t.leases.update()
        .where(
            leases.job_id == lease.job_id,
            leases.stage == lease.stage,
            leases.version == lease.version,
            leases.redispatched_for.is_(None),
        )
        .values(redispatched_for=ledger.now)
    )
    return done.rowcount == 1
