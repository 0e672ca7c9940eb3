"""The TensorBoard backend: event files in the store, read back with TensorBoard's own reader
(tensorboard.backend.event_processing), not with the writer termtune uses."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shared import tracking
from shared.settings import Settings
from shared.store import LocalStore
from tests.factories import make_spec


def _read(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def _text(events, tag):
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def test_a_job_run_is_event_files_beside_the_jobs_outputs(tmp_path):
    store = LocalStore(tmp_path / "store")
    settings = Settings(tracking="tensorboard")  # the deployment's default; no server needed
    spec = tracking.resolve(make_spec(tmp_path, name="tb"), settings)
    assert spec.tracking.backend == "tensorboard"
    run = tracking.start("tb-1", spec, settings, store=store, folder=tmp_path / "train")
    run.log_params({"training": spec.training.model_dump(mode="json"), "base_model": "x"})
    run.log_history([{"loss": 2.5, "step": 10, "epoch": 0.5}, {"loss": 1.5, "step": 20}])
    run.finish_stage()  # the trainer's stage ends: its file is in the store
    ref = run.ref()
    assert ref == {
        "backend": "tensorboard",
        "location": store.uri("jobs/tb-1/tracking/tensorboard"),
        "url": None,
    }
    # The evaluator, in another process (another folder), adds to the same run.
    later = tracking.attach(ref, settings, store=store, folder=tmp_path / "ev", stage="evaluate")
    later.log_metrics([("eval/rougeL/tuned", 0.25, 0), ("gate/passed", 1.0, 0)])
    later.log_dict("evaluation/report.json", {"in": "the job's evaluate folder"})
    later.set_tags({"termtune.gate": "passed"})
    assert later.register("m", "file:///x", tmp_path, {}) is None  # no model registry
    later.end("FINISHED")
    stored = store.list("jobs/tb-1/tracking/tensorboard")
    assert len(stored) == 2 and {k.rsplit(".", 1)[1] for k in stored} == {"train", "evaluate"}
    events = _read(tmp_path / "store" / "jobs" / "tb-1" / "tracking" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.5), (20, 1.5)]
    assert events.Scalars("eval/rougeL/tuned")[0].value == pytest.approx(0.25)
    assert "train/epoch" not in events.Tags()["scalars"]
    assert f"| training.lora.r | {spec.training.lora.r} |" in _text(events, "params")
    assert "| termtune.gate | passed |" in _text(events, "tags")
    assert _text(events, "status") == "FINISHED"


def test_the_spec_names_the_backend_and_nothing_else_accepts_it(tmp_path):
    from shared.errors import SpecError

    assert make_spec(tmp_path, tracking={"backend": "tensorboard"}).tracking.backend == (
        "tensorboard"
    )
    with pytest.raises(SpecError, match="tracking.backend"):
        make_spec(tmp_path, tracking={"backend": "comet"})


def test_curves_reach_the_store_while_the_stage_runs_and_a_resumed_attempt_knows_them(
    tmp_path, monkeypatch
):
    from shared.tracking.tensorboard_run import TensorBoardRun

    store = LocalStore(tmp_path / "store")
    prefix = "jobs/tb-2/tracking/tensorboard"
    monkeypatch.setattr(TensorBoardRun, "ROTATE_EVERY_S", 0.0)
    first = TensorBoardRun(store, prefix, tmp_path / "attempt-1", "train")
    first.log_metrics([("train/loss", 3.0, 1), ("train/loss", 2.0, 2)])
    first.sync()  # mid-stage: the points so far are in the store, readable
    assert [(e.step, e.value) for e in _read(store.path(prefix)).Scalars("train/loss")] == [
        (1, 3.0),
        (2, 2.0),
    ]
    first.sync()  # nothing new: no empty file
    first.log_metrics([("train/loss", 1.5, 3)])
    first.sync()
    assert len(store.list(prefix)) == 2
    first.log_metrics([("train/loss", 1.2, 4)])  # written, never synced: the attempt dies

    # The resumed attempt (another process) asks what the run holds: steps 1-3, not 4.
    again = TensorBoardRun(store, prefix, tmp_path / "attempt-2", "train")
    assert again.logged({"train/loss", "train/lr"}) == {("train/loss", s) for s in (1, 2, 3)}
    again.log_metrics([("train/loss", 1.1, 4), ("train/loss", 1.0, 5)])
    again.finish_stage()
    events = _read(store.path(prefix))
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_files_are_not_cut_more_often_than_every_rotate_every_s(tmp_path):
    from shared.tracking.tensorboard_run import TensorBoardRun

    store = LocalStore(tmp_path / "store")
    run = TensorBoardRun(store, "p", tmp_path / "w", "train")
    assert run.ROTATE_EVERY_S == 60.0
    run.log_metrics([("train/loss", 1.0, 1)])
    run.sync()  # opened less than 60 s ago: the point waits in the open file
    assert store.list("p") == []
    run.finish_stage()
    assert len(store.list("p")) == 1


def test_a_file_cut_short_yields_its_whole_records(tmp_path):
    from shared.tracking.tensorboard_run import TensorBoardRun, scalars

    store = LocalStore(tmp_path / "store")
    run = TensorBoardRun(store, "p", tmp_path / "w", "train")
    run.log_metrics([("train/loss", float(s), s) for s in range(1, 6)])
    run.finish_stage()
    (key,) = store.list("p")
    data = store.get_bytes(key)
    assert [step for tag, step in scalars(data) if tag == "train/loss"] == [1, 2, 3, 4, 5]
    cut = [step for tag, step in scalars(data[:-7]) if tag == "train/loss"]
    assert cut == [1, 2, 3, 4]
