import json
import time
import uuid

import pytest

from shared.bus import ATTEMPT_HEADER, Bus
from shared.jobs import JobRecords
from shared.leases import Lease, LeaseKeeper, expired_leases
from shared.messages import TrainModel, dump_message, parse_message
from shared.reconciler import reconcile_once
from shared.settings import Settings
from shared.store import LocalStore

KEY = "jobs/job-1/train/lease.json"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def _lease(store, owner, ttl=30.0, command=None):
    return Lease(store, KEY, owner=owner, ttl=ttl, command=command or {})


def _expire(store):
    doc = json.loads(store.get_bytes(KEY))
    store.put_bytes(KEY, json.dumps({**doc, "expires_at": time.time() - 1}).encode())


def test_one_owner_at_a_time(store):
    a, b = _lease(store, "a"), _lease(store, "b")
    assert a.acquire() is True
    assert b.acquire() is False
    assert a.acquire() is True  # re-entrant for its owner
    assert a.renew() is True


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(store):
    a, b = _lease(store, "a"), _lease(store, "b")
    assert a.acquire()
    _expire(store)
    assert b.acquire() is True
    assert a.renew() is False
    a.release()  # not a's any more: must not delete b's lease
    assert json.loads(store.get_bytes(KEY))["owner"] == "b"
    b.release()
    assert not store.exists(KEY)


def test_keeper_renews_before_expiry(store):
    lease = _lease(store, "a", ttl=0.6)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        time.sleep(1.5)
        assert not keeper.lost.is_set()
        assert json.loads(store.get_bytes(KEY))["expires_at"] > time.time()


def test_keeper_reports_a_lost_lease(store):
    lease = _lease(store, "a", ttl=0.6)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        store.put_bytes(
            KEY, json.dumps({"owner": "b", "expires_at": time.time() + 60, "command": {}}).encode()
        )
        assert keeper.lost.wait(2.0)


@pytest.fixture
def bus(tmp_path):
    settings = Settings(
        var_dir=tmp_path, broker_url="memory://", exchange=f"t{uuid.uuid4().hex[:8]}"
    )
    bus = Bus(settings)
    bus.declare()
    yield bus
    bus.close()


def _queued(bus):
    with bus.connect() as conn:
        return bus.queues["trainer"].bind(conn.default_channel).get(no_ack=True)


def test_reconciler_resends_an_expired_command_once(store, bus):
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    jobs = JobRecords(store)
    assert _lease(
        store, "dead-worker", command={"body": dump_message(command), "attempt": 1}
    ).acquire()
    assert reconcile_once(jobs, bus) == []  # still valid
    _expire(store)
    assert reconcile_once(jobs, bus) == ["job-1"]
    message = _queued(bus)
    assert parse_message(message.payload) == command
    assert message.headers[ATTEMPT_HEADER] == 2
    assert reconcile_once(jobs, bus) == []  # once per expiry
    assert expired_leases(store) == []
    assert [e.type for e in jobs.events("job-1")] == ["StageProgress"]


def test_reconciler_drops_leases_of_finished_stages(store, bus):
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(store, "w", command={"body": dump_message(command), "attempt": 1}).acquire()
    store.put_json("jobs/job-1/train/manifest.json", {"steps": 6})
    _expire(store)
    assert reconcile_once(JobRecords(store), bus) == []
    assert not store.exists(KEY)
    assert _queued(bus) is None
