from shared.jobs import JobRecords, new_job_id, summarize
from shared.jobspec import JobSpec
from shared.messages import (
    STAGES,
    DatasetPrepared,
    JobSubmitted,
    ModelEvaluated,
    StageFailed,
    StageProgress,
    StageStarted,
)
from shared.store import LocalStore

SPEC = JobSpec(name="terms")


def test_new_job_ids_are_unique_and_named():
    ids = {new_job_id("terms") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("terms-") for i in ids)


def test_summary_follows_the_events():
    events = [
        JobSubmitted(job_id="j", spec_uri="u", name="terms"),
        StageStarted(job_id="j", stage="prepare", worker="w"),
        DatasetPrepared(job_id="j", manifest="m", counts={"train": 7, "test": 3}),
        StageStarted(job_id="j", stage="train", worker="w"),
        StageProgress(job_id="j", stage="train", progress={"step": 3}),
    ]
    job = summarize("j", SPEC, events)
    assert job["status"] == "running"
    assert job["stages"]["prepare"]["status"] == "succeeded"
    assert job["stages"]["train"]["status"] == "running"
    assert job["stages"]["train"]["progress"] == {"step": 3}
    assert job["result"]["prepare"]["counts"] == {"train": 7, "test": 3}


def test_failure_names_stage_and_reason():
    events = [
        StageStarted(job_id="j", stage="prepare", worker="w"),
        StageFailed(job_id="j", stage="prepare", error="no column 'x'", error_type="DatasetError"),
    ]
    job = summarize("j", SPEC, events)
    assert job["status"] == "failed"
    assert job["error"] == {"stage": "prepare", "reason": "no column 'x'", "type": "DatasetError"}


def test_a_failed_or_cancelled_job_says_its_later_stages_are_skipped():
    from shared.messages import JobCancelled

    failed = summarize(
        "j",
        SPEC,
        [
            DatasetPrepared(job_id="j", manifest="m", counts={"train": 7, "test": 3}),
            StageFailed(job_id="j", stage="train", error="boom", error_type="RuntimeError"),
        ],
    )
    assert [failed["stages"][s]["status"] for s in STAGES] == [
        "succeeded",
        "failed",
        "skipped",
        "skipped",
    ]
    cancelled = summarize("j", SPEC, [JobCancelled(job_id="j", stage="prepare")])
    assert cancelled["status"] == "cancelled"
    assert [cancelled["stages"][s]["status"] for s in STAGES[1:]] == ["skipped"] * 3


def test_a_stage_run_in_process_pauses_the_job_until_the_next_starts():
    from shared.messages import JobPaused

    paused = [
        StageStarted(job_id="j", stage="prepare", worker="w"),
        DatasetPrepared(job_id="j", manifest="m", counts={"train": 7, "test": 3}),
        JobPaused(job_id="j", stage="prepare", next="termtune train SPEC --job j"),
    ]
    job = summarize("j", SPEC, paused)
    assert job["status"] == "paused" and job["next"] == "termtune train SPEC --job j"
    job = summarize("j", SPEC, [*paused, StageStarted(job_id="j", stage="train", worker="w")])
    assert job["status"] == "running" and "next" not in job


def test_gate_rejection_ends_the_job_as_rejected():
    events = [
        ModelEvaluated(job_id="j", manifest="m", passed=False, publish=False, reasons=["worse"])
    ]
    job = summarize("j", SPEC, events)
    assert job["status"] == "rejected"
    assert job["stages"]["publish"]["status"] == "skipped"


def test_records_round_trip(tmp_path):
    jobs = JobRecords(LocalStore(tmp_path))
    jobs.create("terms-1", SPEC)
    jobs.record(JobSubmitted(job_id="terms-1", spec_uri="u", name="terms"))
    jobs.record(StageStarted(job_id="terms-1", stage="prepare", worker="w"))
    assert [e.type for e in jobs.events("terms-1")] == ["JobSubmitted", "StageStarted"]
    assert jobs.spec("terms-1") == SPEC
    assert jobs.job_ids() == ["terms-1"]
    assert jobs.manifest("terms-1", "prepare") is None


def test_the_longest_job_name_makes_a_valid_job_id():
    from shared.jobs import new_job_id
    from shared.messages import PrepareDataset

    job_id = new_job_id("a" * 48)
    assert PrepareDataset(job_id=job_id, spec_uri="file:///s").job_id == job_id
