"""A job's view folded one event at a time."""

from functools import reduce

from shared.jobspec import JobSpec
from shared.ledger.view import current_stage, fold, new_view
from shared.messages import (
    STAGES,
    DatasetPrepared,
    JobSubmitted,
    ModelEvaluated,
    StageFailed,
    StageProgress,
    StageStarted,
    dump_message,
)

SPEC = JobSpec(name="terms")


def summarize(job_id, spec, events):
    start = new_view(job_id, spec.name, spec.model_name, "2026-12-03T00:00:00+00:00")
    return reduce(lambda view, e: fold(view, dump_message(e)), events, start)


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


def test_fold_leaves_the_view_it_was_given_alone_and_tracks_the_current_stage():
    start = summarize("j", SPEC, [])
    assert current_stage(start) is None
    started = fold(start, dump_message(StageStarted(job_id="j", stage="prepare", worker="w")))
    assert start["stages"]["prepare"] == {"status": "pending"}
    assert current_stage(started) == "prepare"


def test_only_a_users_retry_withdraws_a_cancel_request():
    """A stage that found an earlier stage's output corrupt records a JobRetried of its
    own: a user's cancel asked before it still stands."""
    from shared.messages import CancelRequested, JobRetried

    asked = [
        DatasetPrepared(job_id="j", manifest="m", counts={"train": 7, "test": 3}),
        CancelRequested(job_id="j"),
        JobRetried(job_id="j", stage="prepare", reason="the prepare stage's manifest: gone"),
    ]
    job = summarize("j", SPEC, asked)
    assert job["cancel_requested"] is True and job["status"] == "queued"
    job = summarize("j", SPEC, [*asked, JobRetried(job_id="j", stage="prepare")])
    assert job["cancel_requested"] is False
