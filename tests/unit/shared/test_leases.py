import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from shared.bus import ATTEMPT_HEADER, Bus
from shared.jobspec import JobSpec
from shared.leases import Lease, LeaseKeeper, expired_leases
from shared.ledger import tables as t
from shared.messages import TrainModel, dump_message, parse_message
from shared.outbox import relay_once
from shared.reconciler import reconcile_once
from shared.settings import Settings
from tests.factories import make_ctx


@pytest.fixture
def jobs(tmp_path):
    jobs = make_ctx(tmp_path / "var").jobs
    jobs.create("job-1", JobSpec(name="job"))
    return jobs


def _lease(jobs, owner, ttl=30.0, command=None):
    return Lease(jobs.ledger, "job-1", "train", owner=owner, ttl=ttl, command=command or {})


def _row(jobs):
    with jobs.ledger.read() as conn:
        return conn.execute(sa.select(t.leases).where(t.leases.c.job_id == "job-1")).first()


def _expire(jobs):
    with jobs.ledger.write() as conn:
        conn.execute(t.leases.update().values(expires_at=jobs.ledger.now - 1))


def test_one_owner_at_a_time(jobs):
    a, b = _lease(jobs, "a"), _lease(jobs, "b")
    assert a.acquire() is True
    assert b.acquire() is False
    assert a.acquire() is True  # re-entrant for its owner
    assert a.renew() is True


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(jobs):
    a, b = _lease(jobs, "a"), _lease(jobs, "b")
    assert a.acquire()
    _expire(jobs)
    assert b.acquire() is True
    assert a.renew() is False
    a.release()  # not a's any more: must not delete b's lease
    assert _row(jobs).owner == "b"
    b.release()
    assert _row(jobs) is None


def test_expiry_is_on_the_database_clock(jobs):
    lease = _lease(jobs, "a", ttl=60)
    assert lease.acquire()
    with jobs.ledger.read() as conn:
        now = jobs.ledger.clock(conn)
    assert 59 < _row(jobs).expires_at - now <= 60
    assert abs(now - time.time()) < 5  # the same machine here: the clocks agree


@pytest.mark.parametrize("round_", range(20))
def test_concurrent_takeovers_of_an_expired_lease_have_exactly_one_winner(jobs, round_):
    assert _lease(jobs, "dead").acquire()
    _expire(jobs)
    contenders = [_lease(jobs, f"w{n}") for n in range(8)]
    start, results = threading.Barrier(len(contenders)), {}

    def take(lease):
        start.wait()
        results[lease.owner] = lease.acquire()

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [owner for owner, won in results.items() if won]
    assert len(winners) == 1, results
    assert _row(jobs).owner == winners[0]


def test_concurrent_first_takes_have_exactly_one_winner(jobs):
    contenders = [_lease(jobs, f"w{n}") for n in range(8)]
    start, results = threading.Barrier(len(contenders)), []

    def take(lease):
        start.wait()
        results.append(lease.acquire())

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_keeper_renews_before_expiry(jobs):
    lease = _lease(jobs, "a", ttl=0.6)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        time.sleep(1.5)
        assert not keeper.lost.is_set()
        assert expired_leases(jobs.ledger) == []


def test_keeper_reports_a_lost_lease(jobs):
    lease = _lease(jobs, "a", ttl=0.6)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        with jobs.ledger.write() as conn:
            conn.execute(t.leases.update().values(owner="b", version=t.leases.c.version + 1))
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


def test_reconciler_resends_an_expired_command_once(jobs, bus):
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(
        jobs, "dead-worker", command={"body": dump_message(command), "attempt": 1}
    ).acquire()
    assert reconcile_once(jobs) == []  # still valid
    _expire(jobs)
    assert reconcile_once(jobs) == ["job-1"]
    assert relay_once(jobs, bus) == 1
    message = _queued(bus)
    assert parse_message(message.payload) == command
    assert message.headers[ATTEMPT_HEADER] == 2
    assert reconcile_once(jobs) == []  # once per expiry
    assert expired_leases(jobs.ledger) == []
    assert [e.type for e in jobs.events("job-1")] == ["StageProgress"]


def _trained(jobs):
    """What a trainer stores and records when the stage succeeds."""
    from shared.messages import ModelTrained

    uri = jobs.write_manifest("job-1", "train", {"steps": 6})
    jobs.record(ModelTrained(job_id="job-1", manifest=uri, train_loss=1.0, steps=6))


def test_reconciler_drops_leases_of_finished_stages(jobs, bus):
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "w", command={"body": dump_message(command), "attempt": 1}).acquire()
    _trained(jobs)  # the worker died after recording the success, before releasing
    _expire(jobs)
    assert reconcile_once(jobs) == []
    assert _row(jobs) is None
    assert relay_once(jobs, bus) == 0 and _queued(bus) is None


def test_a_worker_that_died_after_recording_the_jobs_failure_leaves_it_failed(jobs, bus):
    """A worker killed after recording StageFailed, before releasing its lease: its command
    was sent again and the failed job ran again though nobody retried it. Only a retry runs
    it now."""
    from shared.messages import JobRetried, StageFailed

    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    held = {"body": dump_message(command), "attempt": 3}
    assert _lease(jobs, "w", command=held).acquire()
    jobs.record(
        StageFailed(job_id="job-1", stage="train", error="CUDA out of memory", error_type="OOM")
    )  # ... and then kill -9, the lease still held
    _expire(jobs)
    assert reconcile_once(jobs) == []
    assert _row(jobs) is None
    assert relay_once(jobs, bus) == 0 and _queued(bus) is None
    assert jobs.summary("job-1")["status"] == "failed"
    # A retry resumes the job: a worker lost from then on is recovered again.
    jobs.record(JobRetried(job_id="job-1", stage="train"))
    assert _lease(jobs, "w2", command={"body": dump_message(command), "attempt": 1}).acquire()
    _expire(jobs)
    assert reconcile_once(jobs) == ["job-1"]


def test_a_stage_whose_manifest_is_stored_but_whose_success_is_not_is_sent_again(jobs, bus):
    """Found by the full-size reliability run (2026-12-05): data-prep killed between
    writing its manifest and recording DatasetPrepared. The reconciler took the manifest
    for the stage's end and dropped the lease: the job stayed running for good."""
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "w", command={"body": dump_message(command), "attempt": 1}).acquire()
    jobs.write_manifest("job-1", "train", {"steps": 6})  # ... and then kill -9
    _expire(jobs)
    assert reconcile_once(jobs) == ["job-1"]
    assert relay_once(jobs, bus) == 1 and parse_message(_queued(bus).payload) == command


def test_a_stage_sent_again_to_remake_a_corrupt_output_is_not_finished(jobs, bus):
    """After a JobRetried of the stage (its output found corrupt), the success recorded
    before it does not count: a worker dying in the new run is recovered."""
    from shared.messages import JobRetried

    _trained(jobs)
    assert jobs.finished("job-1", "train")
    jobs.record(JobRetried(job_id="job-1", stage="train", reason="adapter corrupt"))
    assert not jobs.finished("job-1", "train")
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "w", command={"body": dump_message(command), "attempt": 2}).acquire()
    jobs.write_manifest("job-1", "train", {"steps": 6, "again": True})
    _expire(jobs)
    assert reconcile_once(jobs) == ["job-1"]
    _trained(jobs)
    assert jobs.finished("job-1", "train")


def test_a_corrupt_lease_is_quarantined_and_the_others_are_still_reconciled(jobs, bus):
    """Issue 19: one corrupt lease made every reconcile pass fail, so a second job whose
    trainer was killed stayed stuck while a trainer sat idle."""
    from shared.jobspec import JobSpec

    jobs.create("job-2", JobSpec(name="job"))
    command = TrainModel(job_id="job-2", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "dead", command={"body": {"type": "Garbage"}, "attempt": 1}).acquire()
    good = Lease(jobs.ledger, "job-2", "train", owner="dead", ttl=30,
                 command={"body": dump_message(command), "attempt": 1})  # fmt: skip
    assert good.acquire()
    _expire(jobs)
    assert reconcile_once(jobs) == ["job-2"]
    assert relay_once(jobs, bus) == 1 and parse_message(_queued(bus).payload) == command
    failed = jobs.summary("job-1")
    assert failed["status"] == "failed" and failed["error"]["type"] == "CorruptRecord"
    assert reconcile_once(jobs) == []  # set aside: not tried again


def test_a_lease_whose_command_was_sent_again_is_not_renewed_and_the_new_delivery_takes_it(
    jobs, bus
):
    """A database hiccup longer than the lease: the reconciler re-sent the command, then
    the old worker's renewal succeeded, the new delivery was dropped as held by a live
    worker, and once the old worker died the job stayed running for good (the re-sent lease
    is never looked at again). Now the old worker learns it lost the lease."""
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    old = _lease(jobs, "old", command={"body": dump_message(command), "attempt": 1})
    assert old.acquire()
    _expire(jobs)  # ... the database was away longer than the lease
    assert reconcile_once(jobs) == ["job-1"]
    assert old.renew() is False
    new = _lease(jobs, "new", command={"body": dump_message(command), "attempt": 2})
    assert new.acquire() is True
    assert (_row(jobs).owner, _row(jobs).redispatched_for) == ("new", None)
    assert old.renew() is False


def test_an_expired_lease_whose_command_was_not_sent_again_is_still_renewed(jobs):
    """A hiccup past the lease's expiry that the reconciler did not act on costs nothing."""
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    lease = _lease(jobs, "a", command={"body": dump_message(command), "attempt": 1})
    assert lease.acquire()
    _expire(jobs)
    assert lease.renew() is True
    assert reconcile_once(jobs) == []  # renewed: nothing to re-send


def test_keeper_reports_a_lease_whose_command_was_sent_again(jobs):
    lease = _lease(jobs, "a", ttl=0.6)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        with jobs.ledger.write() as conn:  # what the reconciler marks when it re-sends
            conn.execute(t.leases.update().values(redispatched_for=jobs.ledger.now))
        assert keeper.lost.wait(2.0)


def test_a_cancelled_job_whose_worker_died_is_recorded_cancelled(jobs, bus):
    """A cancel asked of a running job whose worker then died: the lease was dropped and
    nothing recorded, so the job stayed running for good (a second cancel did nothing, a
    retry refused a running job). Now the reconciler records the cancellation."""
    from shared.messages import CancelRequested, JobCancelled, StageStarted

    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "w", command={"body": dump_message(command), "attempt": 1}).acquire()
    jobs.record(StageStarted(job_id="job-1", stage="train", worker="w"))
    jobs.cancel(
        "job-1",
        requested=CancelRequested(job_id="job-1"),
        cancelled=JobCancelled(job_id="job-1", stage="train"),
    )  # ... and the worker is killed before it sees the request
    assert jobs.summary("job-1")["status"] == "running"
    _expire(jobs)
    assert reconcile_once(jobs) == []  # not sent again
    assert _row(jobs) is None
    job = jobs.summary("job-1")
    assert job["status"] == "cancelled" and job["stages"]["train"]["status"] == "cancelled"
    assert [e.type for e in jobs.events("job-1")][-1] == "JobCancelled"
    # published as a worker's cancellation is; no command
    assert relay_once(jobs, bus) == 1 and _queued(bus) is None


def test_a_lease_dropped_after_its_worker_recorded_the_cancellation_records_nothing(jobs):
    from shared.messages import CancelRequested, JobCancelled, StageStarted

    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    assert _lease(jobs, "w", command={"body": dump_message(command), "attempt": 1}).acquire()
    jobs.record(StageStarted(job_id="job-1", stage="train", worker="w"))
    jobs.record(CancelRequested(job_id="job-1"))
    jobs.record(JobCancelled(job_id="job-1", stage="train"))  # ... then killed, lease held
    before = len(jobs.events("job-1"))
    _expire(jobs)
    assert reconcile_once(jobs) == []
    assert _row(jobs) is None and len(jobs.events("job-1")) == before
