"""The services as separate processes, started by the same launcher as `make run`."""

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
def services(tmp_path_factory, module_database):
    var = tmp_path_factory.mktemp("e2e") / "var"
    env = pinned_database(var, module_database)
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


def test_job_runs_end_to_end_and_model_answers(services, tiny_model):
    launcher, client = services
    job = _run_job(launcher, client, spec_dict(tiny_model, name="e2e-terms"))
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


def test_job_failing_the_gate_ends_rejected_and_publishes_nothing(services, tiny_model):
    launcher, client = services
    spec = spec_dict(tiny_model, name="strict-gate", evaluation={"gate": {"min_gain": 1.0}})
    job = _run_job(launcher, client, spec)
    assert job["status"] == "rejected"
    assert job["stages"]["publish"]["status"] == "skipped"
    report = client.report(job["id"])
    assert not report["gate"]["publish"]
    assert report["gate"]["reasons"][0].startswith("ROUGE-L")
    assert "strict-gate" not in {m["name"] for m in client.models()}


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
