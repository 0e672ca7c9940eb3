"""The CLI for scripts: `--json` on the read commands, `jobs --limit/--all/--status`,
`--version`, `schema` and the exit statuses, against an in-process control plane."""

from __future__ import annotations

import json
import uuid
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.cli import client as client_module
from services.cli.main import main
from shared.api_models import JobView
from shared.bus import Bus
from shared.settings import ApiSettings
from tests.factories import spec_dict

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.filterwarnings("ignore:You should not use the .timeout. argument")
#: `jobs --json`'s field names: scripts read them, so a rename fails here first
JOB_FIELDS = {
    "id", "name", "status", "model_name", "created_at", "error", "result", "stages",
    "cancel_requested", "retries", "next",
}  # fmt: skip


@pytest.fixture
def api(tmp_path, monkeypatch, tiny_model):
    """A control plane the CLI reaches in-process, holding 7 queued jobs; the list requests."""
    settings = ApiSettings(
        var_dir=tmp_path / "var",
        broker_url="memory://",
        api_key=KEY,
        exchange=f"t{uuid.uuid4().hex[:8]}",
    )
    requests: list[str] = []
    with TestClient(create_app(settings, bus=Bus(settings))) as http:
        http.headers["Authorization"] = f"Bearer {KEY}"
        client = client_module.Client("http://testserver", api_key=KEY)
        client.http = http
        ids = [client.submit(spec_dict(tiny_model, name=f"terms-{n}"))["id"] for n in range(7)]
        http.event_hooks["request"] = [
            lambda r: requests.append(str(r.url.query, "ascii")) if r.url.path == "/v1/jobs" else 0
        ]
        monkeypatch.setattr(client_module, "Client", lambda *args, **kwargs: client)
        yield ids[::-1], requests  # newest first


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_jobs_json_prints_the_newest_20_with_the_apis_field_names(api, capsys):
    newest, _ = api
    assert main(["jobs", "--json"]) == 0
    listed = _json(capsys)
    assert [j["id"] for j in listed] == newest
    assert set(JobView.model_fields) == JOB_FIELDS
    assert {frozenset(j) for j in listed} == {frozenset(JOB_FIELDS)}  # every one, null or not
    assert listed[0]["next"] is None and listed[0]["error"] is None
    assert {j["status"] for j in listed} == {"queued"}


def test_json_outputs_validate_against_the_apis_own_schemas(api, capsys):
    """What scripts parse is what the API documents (its OpenAPI models' JSON Schemas)."""
    from shared.api_models import EventView

    newest, _ = api
    job_schema = JobView.model_json_schema()
    assert main(["jobs", "--json"]) == 0
    listed = _json(capsys)
    assert listed
    for job in listed:
        jsonschema.validate(job, job_schema)
    assert main(["status", newest[0]]) == 0
    jsonschema.validate(_json(capsys), job_schema)
    assert main(["events", newest[0], "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines
    for line in lines:
        jsonschema.validate(json.loads(line), EventView.model_json_schema())
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate({**listed[0], "status": "sleeping"}, job_schema)


def test_jobs_limit_and_status_choose_which(api, capsys):
    newest, requests = api
    assert main(["jobs", "--limit", "3", "--json"]) == 0
    assert [j["id"] for j in _json(capsys)] == newest[:3]
    assert main(["jobs", "--status", "succeeded", "--json"]) == 0
    assert _json(capsys) == []
    assert requests == ["limit=3", "limit=20&status=succeeded"]


def test_jobs_all_reads_page_after_page(api, capsys, monkeypatch):
    newest, requests = api
    monkeypatch.setattr(client_module, "JOB_PAGE_MAX", 3)
    assert main(["jobs", "--all", "--status", "queued"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[i, "queued"] for i in newest]
    assert [q.split("&after=")[0] for q in requests] == ["limit=3&status=queued"] * 3
    assert requests[1].endswith(f"after={newest[2]}") and requests[2].endswith(newest[5])


def test_a_limit_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "--limit", "0"])
    assert exit_.value.code == 2
    assert "argument --limit: '0' is not a whole number of at least 1" in capsys.readouterr().err


def test_events_json_is_one_object_per_line(api, capsys):
    newest, _ = api
    assert main(["events", newest[0], "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["JobSubmitted"]
    assert events[0]["job_id"] == newest[0] and events[0]["seq"] == 1


def test_events_follow_json_prints_each_event_as_events_json_does(api, capsys):
    """`--follow --json` printed the stream's data without its `seq` (the stream's SSE id),
    which a script needs to resume with `after` or Last-Event-ID."""
    newest, _ = api
    client_module.Client().cancel(newest[0])  # a job no stage has started ends at once
    assert main(["events", newest[0], "--json"]) == 0
    listed = capsys.readouterr().out
    assert main(["events", newest[0], "--follow", "--json"]) == 3  # it was cancelled
    followed = capsys.readouterr().out
    assert followed == listed
    events = [json.loads(line) for line in followed.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)) and len(events) >= 2


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"termtune {version('termtune')}\n"


def test_schema_is_the_one_in_docs_and_the_example_passes_it(capsys):
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == (ROOT / "docs" / "job-spec.schema.json").read_text(encoding="utf-8")
    schema = json.loads(printed)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = yaml.safe_load((ROOT / "examples" / "medical-terms.yaml").read_text())
    jsonschema.validate(example, schema)
    assert schema["properties"]["training"]["description"]


def test_the_schema_names_a_wrong_field_as_the_api_does(capsys):
    assert main(["schema"]) == 0
    validator = jsonschema.Draft202012Validator(json.loads(capsys.readouterr().out))
    bad = {"name": "x", "training": {"learning_rate": "fast", "epoks": 3}}
    errors = {tuple(e.absolute_path): e.message for e in validator.iter_errors(bad)}
    assert "fast" in errors[("training", "learning_rate")]
    assert "epoks" in errors[("training",)]  # unknown fields are refused, as by the API


class _Ended:
    """A client whose jobs end with ``status`` and whose report's gate says ``publish``."""

    def __init__(self, status: str, publish: bool) -> None:
        self.status, self.publish = status, publish

    def __call__(self, *args, **kwargs):  # the CLI constructs Client(): hand back this one
        return self

    def report(self, job_id):
        gate = {"publish": self.publish, "forced": False, "checks": [], "reason": "refused"}
        return {"gate": gate, "metrics": {}, "metric_order": [], "capped_at": None}

    def retry(self, job_id):
        return {"id": job_id, "status": "queued", "retries": 1}

    def events(self, job_id):
        return []


@pytest.mark.parametrize(
    ("status", "publish", "code"),
    [("succeeded", True, 0), ("failed", True, 3), ("rejected", False, 3)],
)
def test_exit_status_3_is_a_job_that_did_not_succeed(monkeypatch, status, publish, code):
    from services.cli import display

    monkeypatch.setattr(client_module, "Client", _Ended(status, publish))
    monkeypatch.setattr(
        display, "follow", lambda client, job_id, **_: {"id": job_id, "status": status}
    )
    monkeypatch.setattr(display, "summary", lambda client, job: None)
    assert main(["retry", "j-1", "--wait"]) == code
    assert main(["report", "j-1", "--json"]) == (0 if publish else 3)


def test_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {code}" in out


def test_the_evaluation_line_names_the_dtype_only_where_the_report_records_it():
    from services.cli.display import evaluation_line

    timing = {"base_s": 1.25, "tuned_s": 2.0, "device": "cuda", "batch_size": 16}
    assert evaluation_line({**timing, "dtype": "bfloat16"}) == (
        "evaluation: base 1.2 s + tuned 2.0 s on cuda (bfloat16), batches of 16 by length"
    )
    # an older report (no dtype): no guess
    assert evaluation_line(timing).startswith("evaluation: base 1.2 s + tuned 2.0 s on cuda,")
