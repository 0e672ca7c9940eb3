"""Each ledger test runs on both databases: SQLite (embedded) and PostgreSQL (deployed)."""

from __future__ import annotations

import pytest

from shared.jobs import JobRecords
from shared.ledger import Ledger
from shared.store import LocalStore


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(kind, URL) of an empty database of each kind."""
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server = request.getfixturevalue("postgres")
    url = server.fresh_database()
    yield "postgresql", url
    server.drop_database(url)


@pytest.fixture
def jobs(backend, tmp_path):
    """Job records on a fresh ledger of each kind."""
    ledger = Ledger(backend[1])
    yield JobRecords(LocalStore(tmp_path / "store"), ledger)
    ledger.dispose()
