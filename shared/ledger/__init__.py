"""The job ledger: job state in SQL (SQLite embedded, PostgreSQL deployed); artifacts stay
in the object store."""

from shared.ledger.core import Ledger, open_ledger

__all__ = ["Ledger", "open_ledger"]
