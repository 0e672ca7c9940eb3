"""Experiment tracking against a real MLflow server (tests/mlflow_server.py): what a run holds
is read back from the server, not from termtune's own calls."""

from __future__ import annotations

import pytest

from shared import tracking
from shared.errors import Cancelled, SpecError, TrackingUnavailable
from shared.settings import Settings
from shared.store import LocalStore
from tests.factories import make_spec


def _start(job_id, spec, settings, tmp_path):
    return tracking.start(
        job_id, spec, settings, store=LocalStore(tmp_path / "store"), folder=tmp_path / "tb"
    )


@pytest.fixture
def settings(mlflow_server) -> Settings:
    return Settings(tracking="mlflow", mlflow_tracking_uri=mlflow_server.uri)


def test_the_deployment_default_is_fixed_at_submit_and_refused_without_a_server(tmp_path):
    spec = make_spec(tmp_path)
    assert spec.tracking.backend is None
    assert tracking.resolve(spec, Settings()).tracking.backend == "none"
    with pytest.raises(SpecError, match="TERMTUNE_MLFLOW_TRACKING_URI"):
        tracking.resolve(spec, Settings(tracking="mlflow"))
    chosen = make_spec(tmp_path, tracking={"backend": "none"})
    server = Settings(tracking="mlflow", mlflow_tracking_uri="http://127.0.0.1:1")
    assert tracking.resolve(chosen, server).tracking.backend == "none"  # the spec's wins
    assert tracking.resolve(spec, server).tracking.backend == "mlflow"
    assert _start("job-1", chosen, server, tmp_path) is None


def test_the_experiment_name_is_checked_by_the_spec(tmp_path):
    with pytest.raises(SpecError, match="tracking.experiment"):
        make_spec(tmp_path, tracking={"experiment": "bad\nname"})


def test_a_job_has_one_run_found_again_by_its_tag(settings, tmp_path):
    spec = make_spec(tmp_path, name="one-run", tracking={"experiment": "team/glossaries"})
    first = _start("one-run-1", spec, settings, tmp_path)
    again = _start("one-run-1", spec, settings, tmp_path)  # a retried or resumed stage
    other = _start("one-run-2", spec, settings, tmp_path)
    assert first.run_id == again.run_id != other.run_id
    assert first.experiment_id == other.experiment_id
    runs = f"/#/experiments/{first.experiment_id}/runs/{first.run_id}"
    assert first.url == settings.mlflow_tracking_uri + runs
    got = first.client.get_run(first.run_id)
    assert got.data.tags[tracking.JOB_TAG] == "one-run-1"
    assert got.info.run_name == "one-run-1"
    experiment = first.client.get_experiment(first.experiment_id)
    assert experiment.name == "team/glossaries"
    default = _start("x-1", make_spec(tmp_path, name="x"), settings, tmp_path)
    assert first.client.get_experiment(default.experiment_id).name == "termtune/x"


def test_parameters_curves_and_reports_read_back(settings, tmp_path):
    spec = make_spec(tmp_path, name="read-back")
    run = _start("read-back-1", spec, settings, tmp_path)
    params = {"training": spec.training.model_dump(mode="json"), "note": "é" * 900}
    run.log_params(params)
    run.log_params(params)  # the same values again: a retried stage
    history = [
        {"loss": 2.5, "learning_rate": 1e-3, "epoch": 0.5, "step": 10},
        {"loss": 1.5, "grad_norm": 0.7, "epoch": 1.0, "step": 20},
        {"eval_loss": 1.9, "step": 20},
        {"train_runtime": 3.2, "total_flos": 0, "step": 20, "converged": True},
    ]
    run.log_history(history)
    run.log_metrics([(f"m/{i}", i, i) for i in range(2500)])  # past one batch's 1,000
    run.log_dict("evaluation/report.json", {"rows": 3})
    run.log_text("evaluation/report.html", "<h1>report</h1>")
    client = run.client
    data = client.get_run(run.run_id).data
    assert data.params["training.lora.r"] == str(spec.training.lora.r)
    assert data.params["training.learning_rate"] == str(spec.training.learning_rate)
    assert data.params["note"] == "é" * 500  # cut to what every server keeps
    loss = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(10, 2.5), (20, 1.5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "train/eval_loss")] == [20]
    assert "train/epoch" not in data.metrics and "train/converged" not in data.metrics
    assert data.metrics["m/2499"] == 2499
    assert len([k for k in data.metrics if k.startswith("m/")]) == 2500
    folder = tmp_path / "artifacts"
    client.download_artifacts(run.run_id, "evaluation", str(folder))
    assert (folder / "evaluation" / "report.json").read_text() == '{\n  "rows": 3\n}'
    assert (folder / "evaluation" / "report.html").read_text() == "<h1>report</h1>"


def test_an_export_is_registered_once_with_its_tags(settings, tmp_path):
    export = tmp_path / "model"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "t5"}')
    spec = make_spec(tmp_path, name="registered")
    run = _start("registered-1", spec, settings, tmp_path)
    tags = {tracking.JOB_TAG: "registered-1", "termtune.digest": "abc"}
    local = run.register("glossary-model", export.as_uri(), export, tags)
    again = run.register("glossary-model", export.as_uri(), export, tags)  # a retry
    assert local == again and local["version"] == "1"
    assert local["source"].startswith(f"runs:/{run.run_id}/model")
    run.tag_version(local, {"bedrock.model_arn": "arn:aws:bedrock:us-east-1:1:imported-model/m"})
    client = run.client
    version = client.get_model_version("glossary-model", "1")
    assert version.run_id == run.run_id
    assert version.tags["termtune.digest"] == "abc"
    assert version.tags["bedrock.model_arn"].endswith("imported-model/m")
    copied = tmp_path / "copied"
    client.download_artifacts(run.run_id, "model", str(copied))
    assert (copied / "model" / "config.json").read_text() == '{"model_type": "t5"}'
    # a second job's export of the same name is the next version; S3 exports are not copied
    second = _start("registered-2", spec, settings, tmp_path)
    s3 = second.register("glossary-model", "s3://bucket/jobs/registered-2/model", export, tags)
    assert s3 == {
        "name": "glossary-model",
        "version": "2",
        "source": "s3://bucket/jobs/registered-2/model",
    }
    assert client.list_artifacts(second.run_id) == []
    second.end("FAILED")
    assert client.get_run(second.run_id).info.status == "FAILED"


def test_an_unreachable_server_is_a_retryable_error_naming_the_call(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = Settings(tracking="mlflow", mlflow_tracking_uri="http://127.0.0.1:9")
    with pytest.raises(TrackingUnavailable, match="MLflow: opening experiment 'termtune/down'"):
        _start("down-1", make_spec(tmp_path, name="down"), down, tmp_path)
    ref = {"backend": "mlflow", "run_id": "r1", "experiment_id": "1", "url": None}
    with pytest.raises(TrackingUnavailable, match="run r1 .* no TERMTUNE_MLFLOW_TRACKING_URI"):
        tracking.attach(ref, Settings(), store=None, folder=tmp_path, stage="evaluate")
    for ref in (None, {"backend": "none"}):
        assert tracking.attach(ref, Settings(), store=None, folder=tmp_path, stage="x") is None


@pytest.mark.parametrize(
    ("error", "status", "recorded"),
    [
        (SpecError("bad"), "FAILED", "StageFailed"),
        (Cancelled("cancelled"), "KILLED", "JobCancelled"),
        (RuntimeError("flaky"), "FAILED", "StageFailed"),  # on the final attempt
    ],
)
def test_a_job_ending_in_a_stage_ends_its_run(settings, tmp_path, error, status, recorded):
    from shared.messages import TrainModel
    from shared.stage import run_stage
    from tests.factories import make_ctx

    ctx = make_ctx(tmp_path / "var")
    ctx.settings = ctx.settings.model_copy(
        update={"mlflow_tracking_uri": settings.mlflow_tracking_uri}
    )
    spec = make_spec(tmp_path, name="ends", tracking={"backend": "mlflow"})
    job_id = f"ends-{status.lower()}-{type(error).__name__.lower()}"
    command = TrainModel(
        job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec), dataset_manifest="x"
    )
    opened = {}

    def handler(command, ctx):
        opened["run"] = tracking.start(
            command.job_id, ctx.spec(command), ctx.settings, store=ctx.store, folder=tmp_path
        )
        raise error

    event = run_stage(command, handler, ctx, final_attempt=True)
    assert event.type == recorded
    run = opened["run"]
    assert run.client.get_run(run.run_id).info.status == status


def test_ending_the_run_never_hides_the_jobs_own_error(tmp_path, monkeypatch, caplog):
    import os
    import time

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # MLflow's 7
    down = Settings(tracking="mlflow", mlflow_tracking_uri="http://127.0.0.1:9")
    spec = make_spec(tmp_path, name="quiet", tracking={"backend": "mlflow"})
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="shared.tracking"):
        tracking.end_quietly("quiet-1", spec, down, "FAILED")  # logs, does not raise
    # one quick try: MLflow's own retries with backoff would hold the failing stage minutes
    assert time.monotonic() - started < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # its settings restored
    assert "quiet-1: could not mark its MLflow run FAILED" in caplog.text
    caplog.clear()
    with caplog.at_level("DEBUG", logger="shared.tracking"):
        tracking.end_quietly("quiet-1", make_spec(tmp_path, name="quiet"), Settings(), "FAILED")
    assert caplog.records == []  # not tracked: no call at all
