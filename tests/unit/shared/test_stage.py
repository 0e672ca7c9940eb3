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


class _Bus:
    def __init__(self):
        self.sent = []

    def publish(self, message, headers=None):
        self.sent.append(message)


def test_a_corrupt_earlier_output_runs_that_stage_again_once(ctx):
    """Issue 19: a damaged stored output failed the job, and a retry failed the same way:
    the stage that wrote it counted as done. Now that stage runs again, once."""
    from shared.errors import CorruptOutput
    from shared.outbox import relay_once
    from shared.stage import run_stage

    command = _evaluation_of_a_trained_job(ctx)
    cached = ctx.settings.cache_dir / "artifacts" / "jobs/job-1/train/adapter/weights"
    cached.parent.mkdir(parents=True)
    cached.write_text("this machine's copy")

    def evaluate(command, ctx):
        raise CorruptOutput("adapter_model.safetensors does not match its SHA-256", stage="train")

    event = run_stage(command, evaluate, ctx, dispatch=True)
    assert event.type == "JobRetried" and event.stage == "train"
    assert ctx.jobs.manifest("job-1", "train") is None  # the stage is not done any more
    assert ctx.jobs.manifest("job-1", "prepare") == {"of": "prepare"}
    [kept] = [k for k in ctx.store.list("jobs/job-1/train") if "corrupt" in k]
    assert ctx.store.get_json(kept) == {"of": "train"}  # kept for a look, and the job says where
    assert event.reason == (
        "adapter_model.safetensors does not match its SHA-256; "
        f"its manifest kept as {ctx.store.uri(kept)}"
    )
    assert not cached.exists()  # the next reader fetches the new output
    job = ctx.jobs.summary("job-1")
    assert (job["status"], job["retries"], job["error"]) == ("queued", 1, None)
    bus = _Bus()
    relay_once(ctx.jobs, bus)
    [train] = bus.sent
    assert train.type == "TrainModel" and train.dataset_manifest == command.dataset_manifest
    # Found corrupt a second time: the job fails, set aside again; a retry starts there.
    ctx.jobs.write_manifest("job-1", "train", {"of": "train, again"})
    failed = run_stage(command, evaluate, ctx, dispatch=True)
    assert failed.type == "StageFailed" and failed.permanent
    assert "found corrupt before: not redone again; its manifest kept as " in failed.error
    assert failed.error.endswith("; a retry runs it again)")
    assert ctx.jobs.summary("job-1")["status"] == "failed"
    assert ctx.jobs.resume_command("job-1").type == "TrainModel"


def test_an_unreadable_manifest_is_set_aside_and_the_stage_counts_as_not_done(ctx):
    from shared.jobspec import JobSpec

    ctx.jobs.create("job-1", JobSpec(name="job"))
    ctx.jobs.write_manifest("job-1", "prepare", {"rows": 3})
    key = ctx.jobs.manifest_key("job-1", "prepare")
    ctx.store.put_bytes(key, b'{"rows"')  # cut short
    assert ctx.jobs.manifest("job-1", "prepare") is None
    [kept] = [k for k in ctx.store.list("jobs/job-1/prepare") if "corrupt" in k]
    assert ctx.store.get_bytes(kept) == b'{"rows"'
    assert ctx.jobs.resume_command("job-1").type == "PrepareDataset"


def test_a_stage_whose_lease_is_lost_stops_at_its_next_progress_report(ctx):
    """Evaluation and publishing ran on to the end after their lease was lost (taken over,
    or the command sent again), beside the worker that now holds it."""
    import pytest

    from shared.errors import Interrupted
    from shared.jobspec import JobSpec
    from shared.messages import EvaluateModel
    from shared.stage import run_stage

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    command = EvaluateModel(
        job_id="job-1", spec_uri=uri, dataset_manifest="file:///d", training_manifest="file:///t"
    )

    def evaluate(command, ctx):
        for batch in range(100):
            if batch == 2:
                ctx.lease_lost.set()  # what the lease keeper sets
            ctx.progress({"phase": "generating", "rows_done": batch})
        raise AssertionError("not stopped")

    with pytest.raises(Interrupted, match="evaluate stopped: its lease was lost"):
        run_stage(command, evaluate, ctx)
    assert ctx.jobs.summary("job-1")["status"] == "running"  # the new holder runs it


def test_a_cancel_asked_before_a_corrupt_output_is_redone_still_ends_the_job(ctx):
    """The JobRetried of a redo cleared the user's cancel: the job ran on as if never
    cancelled. Now the stage sent again stops at once and the job ends as cancelled."""
    from shared.errors import CorruptOutput
    from shared.outbox import relay_once
    from shared.stage import run_stage

    command = _evaluation_of_a_trained_job(ctx)

    def evaluate(command, ctx):
        ctx.jobs.request_cancel("job-1")  # a user's cancel, while the stage reads its inputs
        raise CorruptOutput("adapter_model.safetensors does not match its SHA-256", stage="train")

    assert run_stage(command, evaluate, ctx, dispatch=True).type == "JobRetried"
    assert ctx.jobs.cancel_requested("job-1")
    bus = _Bus()
    relay_once(ctx.jobs, bus)
    train = next(m for m in bus.sent if m.type == "TrainModel")
    ran = []
    event = run_stage(train, lambda c, x: ran.append(c), ctx, dispatch=True)
    assert event.type == "JobCancelled" and ran == []
    assert ctx.jobs.summary("job-1")["status"] == "cancelled"


def _evaluation_of_a_trained_job(ctx):
    """job-1 with prepare and train manifests stored, and the command that evaluates it."""
    from shared.jobspec import JobSpec
    from shared.messages import EvaluateModel

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    manifests = {s: ctx.jobs.write_manifest("job-1", s, {"of": s}) for s in ("prepare", "train")}
    return EvaluateModel(
        job_id="job-1",
        spec_uri=uri,
        dataset_manifest=manifests["prepare"],
        training_manifest=manifests["train"],
    )


def test_a_stage_leaves_no_scratch_behind_however_it_ends(ctx):
    """A data-prep that failed late left its tokenized copy of the dataset on the worker
    (scratch was emptied only when the same job ran that stage again): gigabytes a job."""
    import pytest

    from shared.errors import DatasetError, Interrupted
    from shared.jobspec import JobSpec
    from shared.messages import PrepareDataset
    from shared.stage import run_stage

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    command = PrepareDataset(job_id="job-1", spec_uri=uri)
    root = ctx.settings.cache_dir / "scratch"
    kept = root / "job-2" / "train"  # another job's, still in use
    kept.mkdir(parents=True)
    seen = []

    def staging(then):
        def handler(command, ctx):
            folder = ctx.scratch(command, "prepare")
            (folder / "staged.parquet").write_bytes(b"x" * 1000)
            seen.append(folder.is_dir())
            then()

        return handler

    def bad_row():
        raise DatasetError("terms.jsonl: line 3565: column 'definition' is a number")

    def shutdown():
        raise Interrupted("the worker is shutting down")

    assert run_stage(command, staging(bad_row), ctx).type == "StageFailed"
    assert not (root / "job-1").exists()
    with pytest.raises(Interrupted):
        run_stage(command, staging(shutdown), ctx, final_attempt=False)
    assert not (root / "job-1").exists()
    assert seen == [True, True] and kept.is_dir()


def test_a_stage_ending_leaves_the_next_holders_scratch_alone(ctx):
    """Two workers sharing a cache hold one stage in turn, the first still ending (its
    tracking run, a dead letter) as the next begins: the first's end removed the folder the
    next was working in. A folder a killed worker left is removed by the next to begin; one
    another process uses is not, whatever its name says (another container's worker may
    have this one's host name and process id)."""
    import os
    import socket
    import subprocess
    import sys
    from dataclasses import replace

    from shared.jobspec import JobSpec
    from shared.messages import PrepareDataset
    from shared.stage import run_stage

    uri = ctx.jobs.create("job-1", JobSpec(name="job"))
    command = PrepareDataset(job_id="job-1", spec_uri=uri)
    parent = ctx.settings.cache_dir / "scratch" / "job-1" / "prepare"
    left, busy = (parent / f"{socket.gethostname()}-{os.getpid()}-{n}" for n in ("0bad", "0b5y"))
    for folder in (left, busy):
        folder.mkdir(parents=True)
        (folder / ".in-use").touch()
    holder = subprocess.Popen(  # another process holds busy's lock
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(busy / ".in-use")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        following = replace(ctx, scratched=[])
        theirs = []

        def first(command, ctx):
            ctx.scratch(command, "prepare")
            theirs.append(following.scratch(command, "prepare"))  # the next holder begins
            (theirs[0] / "shard-0.parquet").write_bytes(b"y")
            raise OSError("connection reset")

        assert run_stage(command, first, ctx, final_attempt=False) is None  # handed back
        assert (theirs[0] / "shard-0.parquet").read_bytes() == b"y"
        assert not left.exists() and busy.is_dir()
        following.drop_scratch()
        assert sorted(parent.iterdir()) == [busy]
    finally:
        holder.communicate("")
