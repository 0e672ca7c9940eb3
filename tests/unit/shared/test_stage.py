import subprocess
import sys


def test_handlers_import_no_broker_runtime():
    code = (
        "import sys\n"
        "import services.dataprep.handler, services.trainer.handler\n"
        "import services.evaluator.handler, services.publisher.handler\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kombu', 'amqp')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_cancel_stops_a_stage_at_its_next_progress_report(ctx):
    """Evaluation and publishing stop within a report of a cancel (issue 19: evaluation ran
    on for minutes after a cancel)."""
    import time

    from shared.jobspec import JobSpec
    from shared.messages import EvaluateModel
    from shared.stage import run_stage

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    command = EvaluateModel(
        job_id="job-1", spec_uri=uri, dataset_manifest="file:///d", training_manifest="file:///t"
    )
    batches = []

    def evaluate(command, ctx):
        for batch in range(200):
            if batch == 3:
                ctx.jobs.request_cancel("job-1")  # a user's cancel, mid-generation
            ctx.progress({"phase": "generating", "rows_done": batch})
            batches.append(batch)
            time.sleep(0.02)
        raise AssertionError("not stopped")

    event = run_stage(command, evaluate, ctx)
    assert event.type == "JobCancelled" and event.stage == "evaluate"
    assert len(batches) < 3 + 60  # stopped within about a second of reports
    assert ctx.jobs.summary("job-1")["status"] == "cancelled"


def test_a_stopping_worker_hands_a_busy_stage_back_at_its_next_report(ctx):
    """Issue 19: `termtune down` of a stage busy for over 30 s lost its command. Now the stage
    stops at its next progress report, and the worker sends the command again."""
    import pytest

    from shared.errors import Interrupted
    from shared.jobspec import JobSpec
    from shared.messages import PublishModel
    from shared.stage import run_stage

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    command = PublishModel(
        job_id="job-1",
        spec_uri=uri,
        dataset_manifest="d",
        training_manifest="t",
        evaluation_manifest="e",
    )

    def publish(command, ctx):
        for part in range(100):
            if part == 2:
                ctx.stop.set()  # SIGTERM
            ctx.progress({"phase": "uploading", "part": part})
        raise AssertionError("not stopped")

    with pytest.raises(Interrupted, match="publish stopped: the worker is shutting down"):
        run_stage(command, publish, ctx)
    assert ctx.jobs.summary("job-1")["status"] == "running"  # not failed: it goes back
