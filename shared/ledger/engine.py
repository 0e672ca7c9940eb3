"""Connecting to the ledger's database: SQLite embedded, PostgreSQL deployed.

SQLite is opened in WAL mode with a busy timeout (several processes write it), and a
transaction that writes starts with ``BEGIN IMMEDIATE``: it takes the write lock before it
reads, so two writers queue instead of one failing on a stale snapshot. Reads start a
plain deferred transaction and never wait for writers.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from shared.errors import LedgerUnavailable
from shared.ledger.secret import SecretPassword

BUSY_TIMEOUT_MS = 30_000


def database_url(url: str, password: str | None = None) -> URL:
    """The SQLAlchemy URL, with ``password`` put in (it may come from a secret)."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise LedgerUnavailable(f"TERMTUNE_DATABASE_URL is not a database URL: {exc}") from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise LedgerUnavailable(
            f"TERMTUNE_DATABASE_URL: {parsed.get_backend_name()} is not supported "
            "(sqlite:///path or postgresql+psycopg://user@host/db)"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.set(password=password) if password else parsed


def create_ledger_engine(url: URL, secret: SecretPassword | None = None) -> Engine:
    """An engine for the ledger; SQLite gets WAL, a busy timeout and explicit transactions.
    With ``secret``, each new PostgreSQL connection signs in with the password it holds."""
    if url.get_backend_name() != "sqlite":
        engine = sa.create_engine(
            url,
            pool_pre_ping=True,  # a database restart drops pooled connections
            pool_size=5,
            max_overflow=10,
            # UTF-8 whatever the database's encoding: on a SQL_ASCII database (initdb under
            # the C locale) psycopg would return bytes for text, and SQLAlchemy fail at once.
            connect_args={"connect_timeout": 10, "client_encoding": "utf8"},
        )
        if secret is not None:
            _sign_in_with(engine, secret)
        return engine
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions begin where we say (below)
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("termtune_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _sign_in_with(engine: Engine, secret: SecretPassword) -> None:
    """Open each connection with the secret's password; when the database refuses it, read
    the secret again and, if the password changed (a rotation), try once more."""

    @sa.event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        cparams["password"] = secret.current()
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError:
            rotated = secret.refreshed()
            if rotated is None:
                raise
            cparams["password"] = rotated
            return dialect.connect(*cargs, **cparams)


def _wal(cursor: Any) -> None:
    """Switch to WAL (once per database file; a no-op after). Processes opening a new file
    together can be told "database is locked" at once, without the busy timeout: again."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.1))


def now_expr(engine: Engine) -> sa.ColumnElement[float]:
    """The database's clock in epoch seconds (leases expire on one clock, not each worker's)."""
    if engine.dialect.name == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
    return sa.literal_column("extract(epoch from clock_timestamp())::float8", sa.Float)


@contextlib.contextmanager
def unavailable_as_error(url: URL) -> Iterator[None]:
    """Database errors that mean "cannot reach it" become LedgerUnavailable (a 503)."""
    try:
        yield
    except sa.exc.OperationalError as exc:
        where = url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise LedgerUnavailable(f"the job database {where} is unavailable: {reason}") from exc
