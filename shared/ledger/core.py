"""The ledger's database: one engine per URL and process, migrated on first use.

``read()`` and ``write()`` give a connection in a transaction; ``write()`` takes SQLite's
write lock first (``BEGIN IMMEDIATE``). A database that cannot be reached raises
LedgerUnavailable, and nothing of the transaction is kept.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared.ledger import migrate
from shared.ledger.engine import create_ledger_engine, database_url, now_expr, unavailable_as_error
from shared.ledger.secret import SecretPassword
from shared.settings import Settings

_engines: dict[str, Ledger] = {}
_lock = threading.Lock()


class Ledger:
    """A migrated ledger database."""

    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        upgrade: bool = True,
        password_secret: str | None = None,
    ) -> None:
        self.url = database_url(url, password)
        self.secret = SecretPassword(password_secret) if password_secret else None
        self.engine: Engine = create_ledger_engine(self.url, self.secret)
        self.now = now_expr(self.engine)
        self._migrated = not upgrade
        self._migrating = threading.Lock()

    def _ensure_schema(self) -> None:
        """Migrate on first use (not at construction: a database still starting is waited
        for by the request that needs it, which gets a 503 meanwhile, not a dead process)."""
        if self._migrated:
            return
        with self._migrating, unavailable_as_error(self.url):
            if not self._migrated:
                migrate.upgrade(self.engine)
                self._migrated = True

    @property
    def where(self) -> str:
        """The URL without its password (for messages and logs)."""
        return self.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in a read transaction."""
        self._ensure_schema()
        with unavailable_as_error(self.url), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction (committed at the end, rolled back on error)."""
        self._ensure_schema()
        with (
            unavailable_as_error(self.url),
            self.engine.execution_options(termtune_write=True).begin() as conn,
        ):
            yield conn

    def clock(self, conn: Connection) -> float:
        """The database's time, epoch seconds."""
        return float(conn.execute(sa.select(self.now)).scalar_one())

    def dispose(self) -> None:
        """Close pooled connections (a forked child must not share them)."""
        self.engine.dispose()


def open_ledger(settings: Settings) -> Ledger:
    """The process's ledger for the settings' database (one engine per URL, migrated once)."""
    password, secret = settings.database_password, settings.database_password_secret
    key = f"{settings.database_url}|{password or ''}|{secret or ''}"
    with _lock:
        ledger = _engines.get(key)
        if ledger is None:
            ledger = Ledger(settings.database_url, password, password_secret=secret)
            _engines[key] = ledger
        return ledger


def wall_clock() -> float:
    """This process's time, epoch seconds (for display fields; leases use the database's)."""
    return time.time()


def forget(url: str) -> None:
    """Close and drop this process's engines on a database URL (before it is dropped)."""
    with _lock:
        for key in [k for k in _engines if k.split("|", 1)[0] == url]:
            _engines.pop(key).dispose()
