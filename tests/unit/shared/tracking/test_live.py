"""Curves sent while training runs (issue 23: they reached the run only when training ended),
read back from a real MLflow server."""

from __future__ import annotations

import pytest

from shared import tracking
from shared.settings import Settings
from shared.store import LocalStore
from shared.tracking import mlflow_run
from tests.factories import make_spec


def _report(step, **figures):
    return {"step": step, "total_steps": 9, "epoch": 0.1, **figures}


@pytest.fixture
def run(mlflow_server, tmp_path, request):
    settings = Settings(tracking="mlflow", mlflow_tracking_uri=mlflow_server.uri)
    spec = make_spec(tmp_path, name="live-curves")
    return tracking.start(
        request.node.name, spec, settings, store=LocalStore(tmp_path / "s"), folder=tmp_path / "t"
    )


def _history(run, name):
    return [(m.step, m.value) for m in run.client.get_metric_history(run.run_id, name)]


def test_reports_become_points_once_each_with_validation_at_its_own_step(run):
    live = tracking.LiveCurves(run, every=60)
    seen = []
    report = live.tap(lambda progress, *, force=False: seen.append((progress["step"], force)))
    report(_report(1, loss=2.0, learning_rate=1e-3, examples_per_s=8.0), force=False)
    report(_report(2, loss=1.5, learning_rate=9e-4, eval_loss=1.7, eval_step=2), force=True)
    report(_report(3, loss=1.25, eval_loss=1.7, eval_step=2))  # the latest validation, again
    report(_report(3, loss=1.25))  # a report repeated (a relayed rank's)
    report({"phase": "checkpoint stored", "step": 3, "loss": 9.0})  # not a training figure
    report(_report(4, loss=float("nan"), grad_norm=float("inf"), learning_rate=True))
    assert seen == [(1, False), (2, True), (3, False), (3, False), (3, False), (4, False)]
    assert _history(run, "train/loss") == []  # buffered until the timer (60 s here) or exit
    live.flush()
    assert _history(run, "train/loss") == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert _history(run, "train/eval_loss") == [(2, 1.7)]
    assert _history(run, "train/learning_rate") == [(1, 1e-3), (2, 9e-4)]
    assert _history(run, "train/examples_per_s") == [(1, 8.0)]
    assert _history(run, "train/grad_norm") == []  # not finite: not a point


def test_the_timer_sends_without_being_asked_and_the_end_sends_the_rest(run):
    import time

    with tracking.LiveCurves(run, every=0.05) as live:
        live.add(_report(1, loss=2.0))
        deadline = time.monotonic() + 10
        while not _history(run, "train/loss") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _history(run, "train/loss") == [(1, 2.0)]  # sent from the timer's thread
        live.timer.every = 60
        time.sleep(0.1)  # the timer's wait from before the change
        live.add(_report(2, loss=1.0))
    assert _history(run, "train/loss") == [(1, 2.0), (2, 1.0)]  # sent on exit


def test_the_stages_log_adds_only_the_points_the_run_does_not_hold(run):
    """A resumed attempt's log repeats the steps an earlier attempt already sent."""
    first = tracking.LiveCurves(run, every=60)
    first.add(_report(1, loss=2.0))
    first.add(_report(2, loss=1.5))
    first.flush()
    again = tracking.LiveCurves(run, every=60)  # a new process: it knows nothing sent
    again.add(_report(3, loss=1.2))
    again.flush()
    again.add(_report(4, loss=1.1))  # still buffered: not held by the run
    log = [
        {"loss": 2.0, "step": 1},
        {"loss": 1.5, "grad_norm": 0.5, "step": 2},
        {"loss": 1.2, "step": 3},
        {"loss": 1.1, "step": 4},
        {"loss": 1.0, "step": 5},
    ]
    rows = again.unsent(tracking.history_rows(log, "train/"))
    assert rows == [("train/grad_norm", 0.5, 2), ("train/loss", 1.1, 4), ("train/loss", 1.0, 5)]


def test_a_server_that_does_not_answer_keeps_the_points_for_the_next_try(run, monkeypatch, caplog):
    for name, value in mlflow_run.QUICK.items():
        monkeypatch.setenv(name, value)
    live = tracking.LiveCurves(run, every=60)
    reachable = run.client
    run.client = mlflow_run._client(Settings(mlflow_tracking_uri="http://127.0.0.1:1"))
    live.add(_report(1, loss=2.0))
    live.flush()  # no exception: training goes on
    assert "1 points kept" in caplog.text and "logging metrics failed" in caplog.text
    live.add(_report(2, loss=1.0))
    run.client = reachable
    live.flush()
    assert _history(run, "train/loss") == [(1, 2.0), (2, 1.0)]
