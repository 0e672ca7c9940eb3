"""Bringing a ledger database to this code's schema with Alembic, once, under a lock.

Every process may call ``upgrade`` at start: on PostgreSQL an advisory lock, on SQLite the
write lock, lets one of them migrate while the others wait and then find nothing to do. A
database whose schema is newer than any migration this code knows is refused, never
touched.
"""

from __future__ import annotations

from pathlib import Path

import tenacity
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from shared.errors import LedgerSchemaError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK_ID = 0x7E5A7E  # pg_advisory_xact_lock key of termtune's migrations


def alembic_config() -> Config:
    """Alembic's configuration, without an ini file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    """The newest schema revision this code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "locked" in str(exc)


#: SQLite can answer "database is locked" at once, without waiting out its busy timeout,
#: when processes open a new database together (switching it to WAL); the upgrade is
#: idempotent, so it is simply tried again
_patiently = tenacity.retry(
    retry=tenacity.retry_if_exception(_locked),
    stop=tenacity.stop_after_delay(60),
    wait=tenacity.wait_random_exponential(multiplier=0.05, max=1),
    reraise=True,
)


@_patiently
def upgrade(engine: Engine) -> str:
    """Migrate the database to ``head()``; returns the revision it is at."""
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    target = script.get_current_head()
    with engine.execution_options(termtune_write=True).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == target:
            return current or ""
        known = {rev.revision for rev in script.walk_revisions()}
        if current is not None and current not in known:
            raise LedgerSchemaError(
                f"the job database is at schema {current}, newer than this termtune knows "
                f"(up to {target}); upgrade termtune before using this database"
            )
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return target or ""
