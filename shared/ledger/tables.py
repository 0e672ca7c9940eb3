"""The ledger's tables: jobs, their events, stage leases, the outbox, published models and
the names being published.

A job's row carries its folded view (status, stages, results) and is updated in the same
transaction that appends an event, so listing and reading a job never read its events.
Times are epoch seconds (floats) on the database's clock where it matters (leases).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: one row per job; ``number`` orders jobs (newest first = highest) and pages lists
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(120), nullable=False, unique=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(16), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("spec_uri", sa.Text, nullable=False),
    sa.Column("view", sa.JSON, nullable=False),
    sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retry_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "status", "number"),
)

#: a job's events; ``seq`` counts 1, 2, 3... per job with no gaps
events = sa.Table(
    "events",
    metadata,
    sa.Column("job_id", sa.String(120), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("stage", sa.String(16), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
)

#: which worker owns a running stage, until when (database clock), and its command
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("job_id", sa.String(120), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("stage", sa.String(16), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("command", sa.JSON, nullable=False),
    sa.Column("redispatched_for", sa.Float, nullable=True),
    sa.Index(None, "expires_at"),
)

#: messages to publish, written with the record that calls for them; a relay sends them
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(120), nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("claim", sa.String(64), nullable=True),
    sa.Column("claimed_until", sa.Float, nullable=True),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Index(None, "sent_at", "id"),
)

#: how many jobs have each status, kept in the transaction that changes a job's status
#: (/metrics reads a handful of rows, not every job)
status_counts = sa.Table(
    "status_counts",
    metadata,
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("jobs", sa.Integer, nullable=False),
)

#: published models by name
models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("job_id", sa.String(120), nullable=False),
    sa.Column("entry", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

#: the job publishing under a model name, from before its import until it registers: a
#: second job's publish of the name is refused before it imports anything
model_claims = sa.Table(
    "model_claims",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("job_id", sa.String(120), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
