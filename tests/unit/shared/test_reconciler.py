"""The reconciler ends the tracking run of a job it records as cancelled (its worker lost
while the job was being cancelled), as that worker would have. The runs are in a real
MLflow store (SQLite, through MLflow's own client; no server needed)."""

from __future__ import annotations

import time
import uuid

import pytest

from shared.jobspec import JobSpec
from shared.leases import Lease
from shared.ledger import tables as t
from shared.messages import CancelRequested, JobCancelled, StageStarted, TrainModel, dump_message
from shared.reconciler import Reconciler, reconcile_once
from shared.settings import Settings
from shared.tracking import mlflow_run
from tests.factories import make_ctx


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One MLflow store for the module (making one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def jobs(tmp_path):
    jobs = make_ctx(tmp_path / "var").jobs
    name = f"job-{uuid.uuid4().hex[:8]}"  # its own MLflow experiment
    jobs.create("job-1", JobSpec(name=name, tracking={"backend": "mlflow"}))
    return jobs


@pytest.fixture
def settings(tmp_path, mlflow_uri):
    return Settings(var_dir=tmp_path / "var", mlflow_tracking_uri=mlflow_uri)


def _lost_while_cancelling(jobs, stage="train"):
    """A worker on ``stage`` is asked to cancel and is killed before it sees the request:
    its lease expires with nothing recorded."""
    command = TrainModel(job_id="job-1", spec_uri="file:///s", dataset_manifest="file:///m")
    lease = Lease(jobs.ledger, "job-1", stage, owner="w", ttl=30.0)
    lease.command = {"body": dump_message(command), "attempt": 1}
    assert lease.acquire()
    jobs.record(StageStarted(job_id="job-1", stage=stage, worker="w"))
    jobs.cancel(
        "job-1",
        requested=CancelRequested(job_id="job-1"),
        cancelled=JobCancelled(job_id="job-1", stage=stage),
    )
    with jobs.ledger.write() as conn:
        conn.execute(t.leases.update().values(expires_at=jobs.ledger.now - 1))


def _status(run):
    return run.client.get_run(run.run_id).info.status


@pytest.mark.parametrize("given", ["passed", "environment"])
def test_a_job_cancelled_for_its_lost_worker_ends_its_run_killed(
    jobs, settings, monkeypatch, given
):
    run = mlflow_run.open_run("job-1", jobs.spec("job-1"), settings)  # as training does
    _lost_while_cancelling(jobs)
    assert _status(run) == "RUNNING"
    if given == "passed":
        assert reconcile_once(jobs, settings=settings) == []
    else:  # the API's reconciler, built without settings, reads the deployment's
        monkeypatch.setenv("TERMTUNE_MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
        assert reconcile_once(jobs) == []
    assert jobs.summary("job-1")["status"] == "cancelled"
    assert _status(run) == "KILLED"


def test_the_periodic_reconciler_ends_the_run_with_its_settings(jobs, settings):
    run = mlflow_run.open_run("job-1", jobs.spec("job-1"), settings)
    _lost_while_cancelling(jobs)
    deadline = time.monotonic() + 20
    with Reconciler(jobs, every=0.05, settings=settings):
        while _status(run) != "KILLED" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert jobs.summary("job-1")["status"] == "cancelled" and _status(run) == "KILLED"


def test_an_unreachable_tracking_server_never_stops_the_cancellation(jobs, caplog):
    down = Settings(mlflow_tracking_uri="http://127.0.0.1:9")
    _lost_while_cancelling(jobs)
    with caplog.at_level("WARNING"):
        assert reconcile_once(jobs, settings=down) == []
    assert jobs.summary("job-1")["status"] == "cancelled"
    assert "job-1: could not mark its MLflow run KILLED" in caplog.text
    assert "not reconciled" not in caplog.text
