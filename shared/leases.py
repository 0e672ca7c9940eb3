"""Leases in the object store: which worker owns a long stage, renewed by a heartbeat.

A lease is one JSON object (``jobs/<id>/<stage>/lease.json``) holding the owner, an expiry
and the command being worked on. It is taken when absent or expired and renewed with
compare-and-swap, so two workers never both believe they hold it. The reconciler re-sends
the command of a lease that expired (its worker died, even by ``kill -9``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shared.errors import NotFound
from shared.store import Store

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One worker's claim on one stage of one job."""

    store: Store
    key: str
    owner: str
    ttl: float
    command: dict[str, Any] = field(default_factory=dict)
    version: str | None = None

    def _doc(self) -> bytes:
        return json.dumps(
            {"owner": self.owner, "expires_at": time.time() + self.ttl, "command": self.command}
        ).encode()

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours."""
        doc = self._doc()
        if self.store.put_bytes_if_absent(self.key, doc):
            self.version = self.store.get_versioned(self.key)[1]
            return True
        try:
            data, version = self.store.get_versioned(self.key)
        except NotFound:
            return self.acquire()  # released meanwhile
        current = json.loads(data)
        if current["owner"] != self.owner and current["expires_at"] > time.time():
            return False
        return self._swap(doc, version)

    def renew(self) -> bool:
        """Extend the lease; False if another worker took it (it expired)."""
        try:
            data, version = self.store.get_versioned(self.key)
        except NotFound:
            return False
        if json.loads(data)["owner"] != self.owner:
            return False
        return self._swap(self._doc(), version)

    def _swap(self, doc: bytes, version: str) -> bool:
        if not self.store.put_if_version(self.key, doc, version):
            return False
        self.version = self.store.get_versioned(self.key)[1]
        return True

    def release(self) -> None:
        """Give the lease up if it is still ours."""
        try:
            data, _ = self.store.get_versioned(self.key)
        except NotFound:
            return
        if json.loads(data)["owner"] == self.owner:
            self.store.delete(self.key)


class LeaseKeeper:
    """Renews a lease every third of its time to live; sets ``lost`` if renewal fails."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.lease.ttl / 3):
            try:
                if not self.lease.renew():
                    log.error("lease %s lost to another worker", self.lease.key)
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again next beat
                log.warning("lease %s not renewed: %s", self.lease.key, exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def expired_leases(store: Store, *, now: float | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(key, document) of every stage lease past its expiry."""
    now = time.time() if now is None else now
    found = []
    for key in store.list("jobs"):
        if key.endswith("/lease.json"):
            try:
                doc = json.loads(store.get_bytes(key))
            except NotFound:
                continue
            if doc["expires_at"] <= now and doc.get("redispatched_for") != doc["expires_at"]:
                found.append((key, doc))
    return found


def mark_redispatched(store: Store, key: str, doc: dict[str, Any]) -> bool:
    """Record that an expired lease's command was sent again (once per expiry)."""
    try:
        data, version = store.get_versioned(key)
    except NotFound:
        return False
    if json.loads(data) != doc:
        return False  # renewed or taken meanwhile
    return store.put_if_version(
        key, json.dumps({**doc, "redispatched_for": doc["expires_at"]}).encode(), version
    )
