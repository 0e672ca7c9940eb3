from shared.jobs import new_job_id
from shared.jobspec import JobSpec
from shared.messages import JobSubmitted, StageStarted
from tests.factories import make_ctx

SPEC = JobSpec(name="terms")


def test_new_job_ids_are_unique_and_named():
    ids = {new_job_id("terms") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("terms-") for i in ids)


def test_records_round_trip(tmp_path):
    jobs = make_ctx(tmp_path / "var").jobs
    uri = jobs.create("terms-1", SPEC)
    assert jobs.create("terms-1", SPEC) == uri  # once: the same id again changes nothing
    jobs.record(JobSubmitted(job_id="terms-1", spec_uri=uri, name="terms"))
    jobs.record(StageStarted(job_id="terms-1", stage="prepare", worker="w"))
    assert [e.type for e in jobs.events("terms-1")] == ["JobSubmitted", "StageStarted"]
    assert [seq for seq, _ in jobs.events_after("terms-1")] == [1, 2]
    assert jobs.spec("terms-1") == SPEC
    assert jobs.spec_uri("terms-1") == uri and jobs.store.exists(jobs.spec_key("terms-1"))
    views, more = jobs.page()
    assert [v["id"] for v in views] == ["terms-1"] and not more
    assert jobs.summary("terms-1")["status"] == "running"
    assert jobs.manifest("terms-1", "prepare") is None


def test_the_longest_job_name_makes_a_valid_job_id():
    from shared.messages import PrepareDataset

    job_id = new_job_id("a" * 48)
    assert PrepareDataset(job_id=job_id, spec_uri="file:///s").job_id == job_id
