"""The ledger on SQLite and PostgreSQL: ordering, one transaction per record, the outbox,
paging, migrations, an old store imported, a database that goes away and comes back."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from shared.errors import Conflict, LedgerSchemaError, LedgerUnavailable, NotFound
from shared.jobspec import JobSpec
from shared.ledger import Ledger, migrate
from shared.ledger import tables as t
from shared.messages import (
    CancelRequested,
    DatasetPrepared,
    JobCancelled,
    JobRetried,
    JobSubmitted,
    PrepareDataset,
    StageFailed,
    StageProgress,
    StageStarted,
    TrainModel,
)
from shared.outbox import pending, relay_once

SPEC = JobSpec(name="terms")


def _job(jobs, job_id="terms-1", **kw):
    uri = jobs.create(job_id, SPEC, **kw)
    return job_id, uri


class FakeBus:
    """Records what it is asked to publish; ``down`` makes it fail like a dead broker."""

    def __init__(self):
        self.sent, self.down, self.lock = [], False, threading.Lock()

    def publish(self, message, headers=None):
        if self.down:
            raise ConnectionRefusedError("broker down")
        with self.lock:
            self.sent.append((message, headers))


def test_concurrent_appends_are_numbered_without_gaps(jobs):
    job_id, _ = _job(jobs)
    per_thread, threads = 25, 4

    def append(n):
        for step in range(per_thread):
            jobs.record(StageProgress(job_id=job_id, stage="train", progress={"t": n, "s": step}))

    workers = [threading.Thread(target=append, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seqs = [seq for seq, _ in jobs.events_after(job_id)]
    assert seqs == list(range(1, per_thread * threads + 1))
    # each thread's own events keep their order
    for n in range(threads):
        mine = [e.progress["s"] for _, e in jobs.events_after(job_id) if e.progress["t"] == n]
        assert mine == list(range(per_thread))
    assert [seq for seq, _ in jobs.events_after(job_id, 98)] == [99, 100]


def test_status_and_stage_move_with_the_event_that_changes_them(jobs):
    job_id, uri = _job(jobs)
    jobs.record(JobSubmitted(job_id=job_id, spec_uri=uri, name="terms"))
    jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="w"))
    with jobs.ledger.read() as conn:
        row = conn.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id)).one()
    assert (row.status, row.stage, row.last_seq) == ("running", "prepare", 2)
    jobs.record(StageFailed(job_id=job_id, stage="prepare", error="x", error_type="E"))
    assert [v["id"] for v in jobs.page(status="failed")[0]] == [job_id]
    assert jobs.page(status="running") == ([], False)
    assert jobs.counts() == {"failed": 1}


def test_a_failed_transaction_leaves_nothing_half_recorded(jobs):
    job_id, _ = _job(jobs)
    # the second event names no job: the whole record fails
    with pytest.raises(NotFound), jobs.ledger.write() as conn:
        jobs.append(conn, StageStarted(job_id=job_id, stage="prepare", worker="w"))
        jobs.append(conn, StageStarted(job_id="nope-1", stage="prepare", worker="w"))
    assert jobs.events(job_id) == []
    assert jobs.summary(job_id)["status"] == "queued"


def test_pages_go_newest_first_with_a_status_filter(jobs):
    ids = [_job(jobs, f"terms-{n}")[0] for n in range(7)]
    for job_id in ids[::2]:
        jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="w"))
    first, more = jobs.page(limit=3)
    assert [v["id"] for v in first] == ids[::-1][:3] and more
    second, more = jobs.page(limit=3, after=first[-1]["id"])
    assert [v["id"] for v in second] == ids[::-1][3:6] and more
    running, more = jobs.page(status="running", limit=2, after=ids[6])
    assert [v["id"] for v in running] == [ids[4], ids[2]] and more
    with pytest.raises(NotFound):
        jobs.page(after="nope-1")


def test_the_command_is_committed_with_the_record_and_survives_a_broker_outage(jobs):
    bus = FakeBus()
    bus.down = True
    job_id, uri = "terms-1", jobs.store.uri(jobs.spec_key("terms-1"))
    command = PrepareDataset(job_id=job_id, spec_uri=uri)
    jobs.create(
        job_id,
        SPEC,
        submitted=JobSubmitted(job_id=job_id, spec_uri=uri, name="terms"),
        send=[command],
    )
    with pytest.raises(ConnectionRefusedError):
        relay_once(jobs, bus)
    assert pending(jobs) == 1 and jobs.summary(job_id)["status"] == "queued"
    bus.down = False  # the broker is back: the next pass sends it, once
    assert relay_once(jobs, bus) == 1
    assert [m for m, _ in bus.sent] == [command]
    assert relay_once(jobs, bus) == 0 and pending(jobs) == 0


def test_two_relays_at_once_send_each_message_once(jobs):
    job_id, _ = _job(jobs)
    command = TrainModel(job_id=job_id, spec_uri="file:///s", dataset_manifest="file:///m")
    for n in range(60):
        jobs.record(
            StageProgress(job_id=job_id, stage="train", progress={"n": n}),
            send=[(command, {"n": n})],
        )
    bus, start = FakeBus(), threading.Barrier(3)

    def relay():
        start.wait()
        relay_once(jobs, bus, batch=7)

    relays = [threading.Thread(target=relay) for _ in range(3)]
    for r in relays:
        r.start()
    for r in relays:
        r.join()
    assert sorted(h["n"] for _, h in bus.sent) == list(range(60))


def test_cancel_is_one_transaction_and_refuses_an_ended_job(jobs):
    job_id, _ = _job(jobs)
    view = jobs.cancel(
        job_id,
        requested=CancelRequested(job_id=job_id),
        cancelled=JobCancelled(job_id=job_id, stage="prepare"),
    )
    assert view["status"] == "cancelled" and jobs.cancel_requested(job_id)
    assert [e.type for e in jobs.events(job_id)] == ["CancelRequested", "JobCancelled"]
    with pytest.raises(Conflict):
        jobs.cancel(
            job_id,
            requested=CancelRequested(job_id=job_id),
            cancelled=JobCancelled(job_id=job_id, stage="prepare"),
        )
    assert jobs.request_cancel(job_id) is False  # asked once only


def test_outcome_started_and_deaths_count_since_the_last_retry(jobs):
    job_id, _ = _job(jobs)
    for _ in range(2):
        jobs.record(StageStarted(job_id=job_id, stage="train", worker="w"))
    jobs.record(StageProgress(job_id=job_id, stage="train", progress={"step": 1}))
    assert jobs.deaths(job_id, "train") == 2
    jobs.record(
        StageProgress(job_id=job_id, stage="train", progress={"phase": "x", "interrupted": True})
    )
    assert jobs.deaths(job_id, "train") == 1  # the last start ended by an interruption
    jobs.record(DatasetPrepared(job_id=job_id, manifest="m", counts={"train": 1}))
    assert jobs.outcome(job_id, "prepare").manifest == "m"
    jobs.record(StageFailed(job_id=job_id, stage="train", error="x", error_type="E"))
    jobs.record(JobRetried(job_id=job_id, stage="prepare"))
    assert jobs.outcome(job_id, "prepare") is None and jobs.deaths(job_id, "train") == 0
    assert not jobs.started(job_id, "train")


def test_published_models_keep_their_first_owner(jobs):
    from shared.errors import SpecError

    jobs.register_model("terms", {"name": "terms", "job_id": "a", "location": "file:///a"})
    with pytest.raises(SpecError, match="already published by job a"):
        jobs.register_model("terms", {"name": "terms", "job_id": "b", "location": "file:///b"})
    jobs.register_model("terms", {"name": "terms", "job_id": "a", "location": "file:///a2"})
    jobs.register_model(
        "terms", {"name": "terms", "job_id": "b", "location": "file:///b"}, overwrite=True
    )
    assert jobs.model("terms")["job_id"] == "b" and len(jobs.models()) == 1
    # a delete of job a's entry, read before b's publish replaced it, leaves b's alone
    assert not jobs.delete_model("terms", job_id="a")
    assert jobs.model("terms")["job_id"] == "b"
    assert jobs.delete_model("terms", job_id="b")
    with pytest.raises(NotFound):
        jobs.model("terms")


def test_a_model_name_is_claimed_for_one_publishing_job_at_a_time(jobs):
    """Claimed before the import: a second job's publish is refused while the first may still
    import, with overwrite too; a claim whose job ended is taken over, and registering ends
    the claim."""
    from shared.errors import SpecError

    a, _ = _job(jobs, "job-a")
    b, _ = _job(jobs, "job-b")
    jobs.claim_model_name("terms", job_id=a, overwrite=False)
    jobs.claim_model_name("terms", job_id=a, overwrite=False)  # its redelivery
    for overwrite in (False, True):
        with pytest.raises(SpecError, match="job job-a is publishing a model named 'terms' now"):
            jobs.claim_model_name("terms", job_id=b, overwrite=overwrite)
    jobs.record(StageFailed(job_id=a, stage="publish", error="import failed", error_type="E"))
    jobs.claim_model_name("terms", job_id=b, overwrite=False)  # a has ended: b takes it
    jobs.record(JobRetried(job_id=a, stage="publish"))
    with pytest.raises(SpecError, match="job job-b is publishing"):
        jobs.claim_model_name("terms", job_id=a, overwrite=False)
    jobs.register_model("terms", {"name": "terms", "job_id": b, "location": "file:///b"})
    with jobs.ledger.read() as conn:
        assert conn.execute(sa.select(t.model_claims)).all() == []
    with pytest.raises(SpecError, match="already published by job job-b"):
        jobs.claim_model_name("terms", job_id=a, overwrite=False)
    jobs.claim_model_name("terms", job_id=a, overwrite=True)  # b is done: a may replace it


@pytest.mark.parametrize("step", ["claim", "register"])
def test_two_jobs_first_to_a_name_at_once_one_wins_and_the_other_is_told(jobs, step):
    """No row to lock yet: both insert, and the loser gets the name's refusal, not a database
    error retried as if the database were down."""
    from shared.errors import SpecError

    ids = [_job(jobs, f"racer-{n}")[0] for n in range(4)]
    start, outcomes = threading.Barrier(len(ids)), []

    def publish(job_id):
        start.wait()
        try:
            if step == "claim":
                jobs.claim_model_name("shared-name", job_id=job_id, overwrite=False)
            else:
                jobs.register_model("shared-name", {"job_id": job_id, "location": "file:///x"})
            outcomes.append("won")
        except SpecError:
            outcomes.append("refused")
        except Exception as exc:  # noqa: BLE001
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=publish, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["won"]


def test_two_submissions_of_one_model_name_at_once_record_one_job(jobs, monkeypatch):
    """Both passed the check before either recorded its job, and both trained: the second
    to be refused only at publish, after all its GPU time."""
    import time

    from shared.errors import SpecError
    from shared.jobs import JobRecords

    insert = JobRecords._insert_job

    def slow_insert(self, *args, **kwargs):  # each looked before any inserted
        time.sleep(0.3)
        return insert(self, *args, **kwargs)

    monkeypatch.setattr(JobRecords, "_insert_job", slow_insert)
    start, outcomes = threading.Barrier(4), []

    def submit(n):
        spec = JobSpec(name=f"racer-{n}", publish={"model_name": "shared-name"})
        start.wait()
        try:
            jobs.create(f"racer-{n}", spec, own_name=True)
            outcomes.append("created")
        except SpecError:
            outcomes.append("refused")
        except Exception as exc:  # noqa: BLE001
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] + ["refused"] * 3
    [kept] = [job["id"] for job in jobs.page()[0]]
    refused = {f"racer-{n}" for n in range(4)} - {kept}
    assert not any(jobs.store.exists(jobs.spec_key(job_id)) for job_id in refused)
    jobs.create("racer-9", JobSpec(name="racer-9", publish={"model_name": "shared-name"}))


def test_the_migrations_build_the_tables_the_code_declares(backend):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    ledger = Ledger(backend[1])
    with ledger.read():
        pass  # migrated to head
    with ledger.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), t.metadata)
    ledger.dispose()
    assert differences == []


def test_a_schema_newer_than_this_code_is_refused_untouched(backend):
    ledger = Ledger(backend[1])
    with ledger.read():
        pass  # migrated to head
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    again = Ledger(backend[1])
    with (
        pytest.raises(LedgerSchemaError, match="schema 9999, newer than this termtune"),
        again.read(),
    ):
        pass
    assert migrate.current_revision(ledger.engine) == "9999"
    ledger.dispose()
    again.dispose()


def test_migrations_run_once_when_many_processes_start_together(backend):
    ledgers = [Ledger(backend[1]) for _ in range(4)]
    errors, start = [], threading.Barrier(len(ledgers))

    def migrate_one(ledger):
        start.wait()
        try:
            migrate.upgrade(ledger.engine)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=migrate_one, args=(x,)) for x in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert migrate.current_revision(ledgers[0].engine) == migrate.head()
    for ledger in ledgers:
        ledger.dispose()


def test_an_unreachable_database_is_a_clear_retryable_error():
    ledger = Ledger("postgresql+psycopg://termtune:secret@127.0.0.1:9/termtune")
    with pytest.raises(LedgerUnavailable) as caught, ledger.read():
        pass
    assert "127.0.0.1:9/termtune is unavailable" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_the_database_restarting_loses_nothing_and_the_ledger_reconnects(postgres, tmp_path):
    from shared.jobs import JobRecords
    from shared.store import LocalStore

    url = postgres.fresh_database()
    jobs = JobRecords(LocalStore(tmp_path / "store"), Ledger(url))
    job_id, _ = _job(jobs)
    jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="w"))
    postgres.stop("immediate")  # a crash, not a clean shutdown
    try:
        with pytest.raises(LedgerUnavailable):
            jobs.record(StageProgress(job_id=job_id, stage="prepare", progress={"n": 1}))
    finally:
        postgres.start()
    jobs.record(StageProgress(job_id=job_id, stage="prepare", progress={"n": 2}))
    assert [seq for seq, _ in jobs.events_after(job_id)] == [1, 2]
    assert jobs.summary(job_id)["stages"]["prepare"]["progress"] == {"n": 2}
    jobs.ledger.dispose()
    postgres.drop_database(url)


def test_a_database_made_under_the_c_locale_works_all_the_same(postgres, tmp_path):
    """Issue 20: a PostgreSQL initialised under the C locale has SQL_ASCII as its encoding;
    psycopg then returned bytes for text and the first connection failed ("cannot use a
    string pattern on a bytes-like object"). The ledger asks for UTF-8 on every connection."""
    from shared.jobs import JobRecords
    from shared.store import LocalStore

    name = "t_sql_ascii_" + tmp_path.name[-8:].replace("-", "_")
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    admin.dispose()
    url = postgres.url(name)
    jobs = JobRecords(LocalStore(tmp_path / "store"), Ledger(url))
    job_id, _ = _job(jobs)
    jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="wörker"))
    assert jobs.summary(job_id)["stages"]["prepare"]["worker"] == "wörker"
    with jobs.ledger.read() as conn:
        assert conn.exec_driver_sql("SHOW server_encoding").scalar() == "SQL_ASCII"
    jobs.ledger.dispose()
    postgres.drop_database(url)


def test_an_old_store_is_imported_once_job_by_job(jobs):
    import json

    from shared.ledger.importer import import_store
    from shared.messages import dump_message

    store = jobs.store
    old = ["terms-20261101000000000000-aaaaaa", "terms-20261102000000000000-bbbbbb"]
    for n, job_id in enumerate(old):
        store.put_bytes(f"jobs/{job_id}/spec.json", SPEC.model_dump_json().encode())
        events = [
            JobSubmitted(job_id=job_id, spec_uri=store.uri(f"jobs/{job_id}/spec.json"), name="t"),
            StageStarted(job_id=job_id, stage="prepare", worker="w"),
            StageFailed(job_id=job_id, stage="prepare", error="boom", error_type="E"),
        ]
        for i, event in enumerate(events[: 2 + n]):
            store.put_json(f"jobs/{job_id}/events/{i:020d}-x.json", dump_message(event))
    store.put_bytes(f"jobs/{old[0]}/cancel", b"cancel requested\n")
    broken = "terms-20261103000000000000-cccccc"
    store.put_bytes(f"jobs/{broken}/spec.json", SPEC.model_dump_json().encode())
    store.put_bytes(f"jobs/{broken}/events/00000000000000000001-x.json", b"{not json")
    store.put_bytes("models/terms.json", json.dumps({"name": "terms", "job_id": old[1]}).encode())

    report = import_store(jobs)
    assert report.imported == old and report.models == 1
    assert list(report.failed) == [broken]
    assert "00000000000000000001-x.json: not JSON (line 1, column 2)" in report.failed[broken]
    assert not jobs.exists(broken)  # nothing of it half-written
    assert [v["id"] for v in jobs.page()[0]] == old[::-1]
    assert jobs.summary(old[0])["status"] == "running" and jobs.cancel_requested(old[0])
    assert jobs.summary(old[1])["status"] == "failed"
    assert jobs.model("terms")["job_id"] == old[1]
    again = import_store(jobs)
    assert again.imported == [] and again.already == old and again.models == 0


def test_status_counts_follow_every_change_even_concurrent(jobs):
    ids = [_job(jobs, f"terms-{n}")[0] for n in range(12)]

    def run(job_id, n):
        jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="w"))
        if n % 3 == 0:
            jobs.record(StageFailed(job_id=job_id, stage="prepare", error="x", error_type="E"))

    threads = [threading.Thread(target=run, args=(j, n)) for n, j in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with jobs.ledger.read() as conn:
        query = sa.select(t.jobs.c.status, sa.func.count()).group_by(t.jobs.c.status)
        counted = {status: n for status, n in conn.execute(query)}
    assert jobs.counts() == counted == {"running": 8, "failed": 4}


def test_migration_0002_counts_the_jobs_already_there(backend, tmp_path):
    from alembic import command

    from shared.jobs import JobRecords
    from shared.store import LocalStore

    ledger = Ledger(backend[1], upgrade=False)
    config = migrate.alembic_config()
    with ledger.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        for n, status in enumerate(["failed", "failed", "succeeded"]):
            conn.execute(
                t.jobs.insert().values(
                    id=f"old-{n}", name="old", status=status, created_at=0, updated_at=0,
                    spec={}, spec_uri="file:///s", view={}, last_seq=0, retry_seq=0,
                    cancel_requested=False,
                )
            )  # fmt: skip
    assert migrate.upgrade(ledger.engine) == migrate.head()
    jobs = JobRecords(LocalStore(tmp_path / "store"), ledger)
    assert jobs.counts() == {"failed": 2, "succeeded": 1}
    ledger.dispose()


def test_only_a_users_retry_withdraws_a_cancel_request(jobs):
    """Every JobRetried cleared the cancel flag, the one a stage records when it finds an
    earlier stage's output corrupt too: a user's cancel was dropped and the job ran on."""
    from shared.messages import JobRetried

    job_id, _ = _job(jobs)
    assert jobs.request_cancel(job_id)
    jobs.record(JobRetried(job_id=job_id, stage="prepare", reason="its manifest is gone"))
    assert jobs.cancel_requested(job_id) and jobs.summary(job_id)["cancel_requested"]
    jobs.record(JobRetried(job_id=job_id, stage="prepare"))  # a user's
    assert not jobs.cancel_requested(job_id) and not jobs.summary(job_id)["cancel_requested"]


def test_concurrent_retries_of_a_failed_job_resume_it_once(jobs):
    """The API read the status, then recorded the retry in another transaction: two retries
    at once both resumed the job (two JobRetried, two commands)."""
    from shared.messages import JobRetried

    job_id, _ = _job(jobs)
    jobs.record(StageFailed(job_id=job_id, stage="prepare", error="x", error_type="X"))
    start, results = threading.Barrier(4), []

    def retry():
        start.wait()
        try:
            jobs.retry(
                job_id,
                retried=JobRetried(job_id=job_id, stage="prepare"),
                send=[PrepareDataset(job_id=job_id, spec_uri="file:///s")],
            )
            results.append("retried")
        except Conflict as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=retry) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results)[-1] == "retried" and results.count("retried") == 1, results
    assert all("only failed or cancelled jobs are retried" in r for r in results if r != "retried")
    assert [e.type for e in jobs.events(job_id)].count("JobRetried") == 1
    with jobs.ledger.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.outbox)).scalar() == 1
