"""The services as separate processes, started by the same launcher as `make run`."""

import json
import socket
from pathlib import Path

import pytest

from services.cli.client import Client
from services.cli.display import follow
from services.cli.launcher import Launcher
from shared.jobspec import GateSpec
from tests.factories import pinned_database, spec_dict

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def services(tmp_path_factory, module_database, mlflow_server):
    var = tmp_path_factory.mktemp("e2e") / "var"
    env = pinned_database(var, module_database)
    # The deployment has an MLflow server; jobs are tracked when their spec asks.
    env["TERMTUNE_MLFLOW_TRACKING_URI"] = mlflow_server.uri
    launcher = Launcher(var_dir=var, port=_free_port(), env=env)
    launcher.start()
    try:
        launcher.wait_ready(timeout=120)
        key = (launcher.run_dir / "api_key").read_text().strip()
        yield launcher, Client(launcher.url, api_key=key)
    except BaseException:
        print(launcher.logs_tail(80))
        raise
    finally:
        launcher.stop()


def _run_job(launcher, client, spec):
    return _run_job_follow(launcher, client, client.submit(spec)["id"])


def test_bad_dataset_fails_the_job_by_name_and_services_keep_serving(
    services, tiny_model, tmp_path
):
    launcher, client = services
    spec = spec_dict(
        tiny_model, name="bad-data", dataset={"source": str(tmp_path / "no-such-file.jsonl")}
    )
    job = _run_job(launcher, client, spec)
    assert job["status"] == "failed"
    assert job["error"]["stage"] == "prepare"
    assert "file not found" in job["error"]["reason"]
    assert "no-such-file.jsonl" in job["error"]["reason"]
    assert all(p.poll() is None for p in launcher.processes.values())


def test_spec_with_unknown_field_is_refused_before_any_work(services, tiny_model):
    from shared.errors import SpecError

    _, client = services
    with pytest.raises(SpecError, match="field 'training.epocs': unknown field"):
        client.submit(spec_dict(tiny_model, training={"epocs": 3}))


def test_job_runs_end_to_end_and_model_answers(services, tiny_model, mlflow_server, tmp_path):
    launcher, client = services
    tracked = {"backend": "mlflow", "experiment": "e2e/terms"}
    job = _run_job(launcher, client, spec_dict(tiny_model, name="e2e-terms", tracking=tracked))
    assert job["status"] == "succeeded", job
    assert [job["stages"][s]["status"] for s in job["stages"]] == ["succeeded"] * 4
    assert job["result"]["prepare"]["counts"] == {"train": 176, "test": 75}
    assert job["result"]["train"]["steps"] == 6
    report = client.report(job["id"])
    assert report["gate"]["passed"]
    [model] = [m for m in client.models() if m["name"] == "e2e-terms"]
    assert model["target"] == "local" and model["job_id"] == job["id"]
    answer = client.invoke("e2e-terms", "What is Asthma", max_gen_len=8)
    assert answer["generation_token_count"] >= 1
    assert answer["stop_reason"] in ("stop", "length")
    workers = {job["stages"][s]["worker"] for s in job["stages"]}
    assert len(workers) == 4  # each stage ran in its own process
    streamed = [e["type"] for e in client.stream_events(job["id"])]  # ended: closes by itself
    assert streamed == [e["type"] for e in client.events(job["id"])]
    assert streamed[-1] == "ModelPublished"
    _check_the_mlflow_run(job, client.report(job["id"]), model, mlflow_server, tmp_path)


def _check_the_mlflow_run(job, report, model, server, tmp_path):
    """The job's run as the MLflow server holds it: params, curves, evaluation, registry."""
    import json

    from mlflow import MlflowClient

    ref = job["result"]["train"]["tracking"]
    assert ref["url"] == f"{server.uri}/#/experiments/{ref['experiment_id']}/runs/{ref['run_id']}"
    mlflow = MlflowClient(server.uri)
    run = mlflow.get_run(ref["run_id"])
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "e2e/terms"
    assert run.data.tags["termtune.job_id"] == job["id"]
    assert run.data.tags["termtune.gate"] == "passed"
    assert run.data.tags["termtune.model_name"] == "e2e-terms"
    assert run.data.params["training.max_steps"] == "6"
    assert run.data.params["plan.batch_size"] == "8"
    loss = mlflow.get_metric_history(ref["run_id"], "train/loss")
    assert [m.step for m in loss] == [2, 4, 6]
    assert run.data.metrics["train/mean_loss"] == pytest.approx(
        job["result"]["train"]["train_loss"]
    )
    rouge = report["metrics"]["rougeL"]
    assert run.data.metrics["eval/rougeL/tuned"] == pytest.approx(rouge["tuned"])
    assert run.data.metrics["eval/rougeL/delta_ci95_low"] == pytest.approx(rouge["ci95"][0])
    assert run.data.metrics["gate/passed"] == 1.0
    mlflow.download_artifacts(ref["run_id"], "evaluation", str(tmp_path))
    assert json.loads((tmp_path / "evaluation" / "report.json").read_text()) == report
    assert len(json.loads((tmp_path / "evaluation" / "samples.json").read_text())) == 8
    assert "Quality gate" in (tmp_path / "evaluation" / "report.html").read_text()
    registered = job["result"]["publish"]["registered_model"]
    assert registered["name"] == "e2e-terms" and model["registered_model"] == registered
    version = mlflow.get_model_version("e2e-terms", registered["version"])
    assert version.run_id == ref["run_id"]
    assert version.tags == {"termtune.job_id": job["id"], "termtune.digest": model["digest"]}
    mlflow.download_artifacts(ref["run_id"], "model", str(tmp_path))
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "model" / "README.md").read_text().startswith("---\n")


def test_job_failing_the_gate_ends_rejected_and_publishes_nothing(services, tiny_model):
    launcher, client = services
    spec = spec_dict(
        tiny_model,
        name="strict-gate",
        evaluation={"gate": {"min_gain": 1.0}},
        tracking={"backend": "tensorboard"},
    )
    job = _run_job(launcher, client, spec)
    assert job["status"] == "rejected"
    _check_the_tensorboard_run(launcher, job)
    assert job["stages"]["publish"]["status"] == "skipped"
    report = client.report(job["id"])
    assert not report["gate"]["publish"]
    assert report["gate"]["reasons"][0].startswith("ROUGE-L")
    assert "strict-gate" not in {m["name"] for m in client.models()}


def _check_the_tensorboard_run(launcher, job):
    """The trainer's and the evaluator's event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = job["result"]["train"]["tracking"]
    folder = launcher.var_dir / "store" / "jobs" / job["id"] / "tracking" / "tensorboard"
    assert ref["location"] == folder.as_uri()
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert events.Scalars("gate/passed")[0].value == 0.0  # the gate kept it back
    status = events.Tensors("status/text_summary")[0].tensor_proto.string_val[0]
    assert status == b"FINISHED"  # the job ended at the gate: so did its run


def test_cancel_during_training_ends_the_job_cancelled(services, tiny_model):
    import time

    launcher, client = services
    spec = spec_dict(tiny_model, name="cancel-me", training={"max_steps": 2000, "logging_steps": 2})
    job = client.submit(spec)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = client.job(job["id"])["stages"]["train"].get("progress") or {}
        if progress.get("step", 0) >= 4:
            break
        time.sleep(0.2)
    client.cancel(job["id"])
    done = _run_job_follow(launcher, client, job["id"])
    assert done["status"] == "cancelled"
    assert done["stages"]["train"]["status"] == "cancelled"
    assert done["stages"]["evaluate"]["status"] == "skipped"
    assert done["stages"]["publish"]["status"] == "skipped"
    assert all(p.poll() is None for p in launcher.processes.values())


def _run_job_follow(launcher, client, job_id):
    try:
        return follow(client, job_id, timeout=900, poll=0.5)
    except BaseException:
        print(launcher.logs_tail(80))
        raise


SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the public glossaries are not at {SHARED_DATA}"
)
def test_a_public_glossary_runs_end_to_end_under_the_default_gate(services, tiny_model):
    """The CDC Plain Language Thesaurus (891 rows nobody here wrote), the gate's defaults."""
    launcher, client = services
    spec = spec_dict(
        tiny_model,
        name="cdc-thesaurus",
        dataset={
            "source": str(SHARED_DATA / "cdc_plain_language_thesaurus.jsonl"),
            "prompt_template": "In plain words, {term}",
            "target_template": "{definition}",
            "max_target_length": "auto",
        },
        training={"max_steps": 60, "logging_steps": 10},
        evaluation={"max_rows": 48, "gate": GateSpec().model_dump()},  # the defaults
    )
    job = _run_job(launcher, client, spec)
    prepared = job["result"]["prepare"]
    assert sum(prepared["counts"].values()) == 891 - sum(prepared["dropped"].values())
    assert prepared["tokens"]["target"]["max_length"] <= 512  # "auto" chose under its cap
    report = client.report(job["id"])
    rules = {rule["rule"]: rule for rule in report["gate"]["rules"]}
    assert set(rules) == {"rougeL_gain", "empty_share", "degenerate_share", "lower_loss"}
    assert all(rule["values"] for rule in rules.values())  # each verdict with its numbers
    assert report["metrics"]["loss"]["tuned"] < report["metrics"]["loss"]["base"]
    published = job["model_name"] in {m["name"] for m in client.models()}
    assert job["status"] == ("succeeded" if report["gate"]["passed"] else "rejected")
    assert published == report["gate"]["passed"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_decoder_only_job_runs_end_to_end_and_answers_chat_as_evaluated(
    services, family, tmp_path
):
    """A tiny Llama- and a tiny Qwen-shaped model through the same four processes: trained
    in their chat template, published with it, and asked through chat completions the answer
    the evaluator scored."""
    from services.cli.tinycausal import build_tiny_causal
    from tests.factories import SAMPLE_DATA

    launcher, client = services
    model = build_tiny_causal(family, tmp_path / family, data_file=SAMPLE_DATA)
    spec = spec_dict(model, name=f"e2e-{family}", tracking={"backend": "wandb"})
    job = _run_job(launcher, client, spec)
    assert job["status"] == "succeeded", job
    _check_the_wandb_run(launcher, job)
    assert job["result"]["train"]["steps"] == 6
    entry = client.model(f"e2e-{family}")
    assert entry["chat"] is True and entry["job_id"] == job["id"]
    sample = client.report(job["id"])["samples"][0]
    body = {"messages": [{"role": "user", "content": sample["prompt"]}]}
    reply = client.invoke_body(f"e2e-{family}", body)
    assert reply["choices"][0]["message"]["content"] == sample["tuned"]
    workers = {job["stages"][s]["worker"] for s in job["stages"]}
    assert len(workers) == 4


def _check_the_wandb_run(launcher, job):
    """Three processes' parts of one W&B run (offline: W&B's client wrote them), read back
    from the store: the curves, the evaluation, the export's model artifact."""
    from shared.tracking.wandb_run import history, records, summary

    ref = job["result"]["train"]["tracking"]
    folder = launcher.var_dir / "store" / "jobs" / job["id"] / "tracking" / "wandb"
    assert ref["location"] == folder.as_uri() and ref["run_id"] == job["id"]
    parts = [p.read_bytes() for p in sorted(folder.glob("*/run-*.wandb"))]
    assert [p.name.rsplit("-", 1)[1] for p in sorted(folder.iterdir())] == [
        "train",
        "evaluate",
        "publish",
    ]
    train, evaluate, publish = parts
    assert [h["train/step"] for h in history(train) if "train/loss" in h] == [2, 4, 6]
    assert "eval/rougeL/tuned" in summary(evaluate)
    (model,) = [r.artifact for r in records(publish) if r.HasField("artifact")]
    assert model.name == job["model_name"] and model.type == "model"
    assert json.loads(model.metadata)["termtune.job_id"] == job["id"]
    assert summary(publish)["termtune.status"] == "FINISHED"
