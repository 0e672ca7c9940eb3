"""The control plane with TestClient, an in-memory bus and a temporary store."""

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from shared.bus import Bus
from shared.messages import parse_message
from shared.settings import ApiSettings

KEY = "test-key-123"


@pytest.fixture
def app_env(tmp_path):
    settings = ApiSettings(
        var_dir=tmp_path, broker_url="memory://", api_key=KEY, exchange=f"t{uuid.uuid4().hex[:8]}"
    )
    bus = Bus(settings)
    app = create_app(settings, bus=bus)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, bus, app


def _queued(bus, service, wait=5.0):
    """The next command on a service's queue (the outbox relay sends it within moments of
    the commit), or None after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    with bus.connect() as conn:
        queue = bus.queues[service].bind(conn.default_channel)
        while (message := queue.get(no_ack=True)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return parse_message(message.payload) if message else None


def test_health_needs_no_key(app_env):
    client, _, _ = app_env
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "headers,code",
    [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic abc"}, 401)],
)
def test_routes_need_the_key(app_env, headers, code):
    client, _, _ = app_env
    client.headers.pop("Authorization")
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/models"),
        ("post", "/v1/models/x/invoke"),
        ("get", "/v1/jobs/x/events"),
        ("post", "/v1/jobs/x/retry"),
        ("delete", "/v1/models/x"),
        ("get", "/v1/imported-models"),
        ("post", "/v1/estimate"),
        ("get", "/metrics"),
    ]:
        response = client.request(method, path, headers=headers)
        assert response.status_code == code, (method, path)
        # A malformed body changes nothing: the key is checked before the body is read.
        if method == "post":
            broken = client.request(method, path, headers=headers, content=b"{not json")
            assert broken.status_code == code, (method, path, broken.text)


def test_submit_records_job_and_rings_dataprep(app_env):
    client, bus, app = app_env
    response = client.post("/v1/jobs", json={"name": "terms", "dataset": {"source": "x.jsonl"}})
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "queued" and job["id"].startswith("terms-")
    command = _queued(bus, "dataprep")
    assert command.type == "PrepareDataset" and command.job_id == job["id"]
    assert app.state.jobs.spec(job["id"]).dataset.source == "x.jsonl"
    listed = client.get("/v1/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"status": "failed"}).json()["count"] == 0
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events] == ["JobSubmitted"]


def test_invalid_spec_names_the_field_and_queues_nothing(app_env):
    client, bus, _ = app_env
    response = client.post("/v1/jobs", json={"name": "terms", "training": {"epochz": 2}})
    assert response.status_code == 422
    assert "field 'training.epochz': unknown field" in response.json()["detail"]
    assert _queued(bus, "dataprep", wait=1.0) is None


def test_tracking_is_fixed_at_submission_and_refused_without_a_server(app_env):
    client, bus, app = app_env
    asks = {"name": "terms", "tracking": {"backend": "mlflow"}}
    response = client.post("/v1/jobs", json=asks)
    assert response.status_code == 422
    assert "TERMTUNE_MLFLOW_TRACKING_URI" in response.json()["detail"]
    assert _queued(bus, "dataprep", wait=1.0) is None and app.state.jobs.page() == ([], False)
    job = client.post("/v1/jobs", json={"name": "terms"}).json()
    assert app.state.jobs.spec(job["id"]).tracking.backend == "none"  # the deployment's


def test_a_published_name_is_refused_at_submission_unless_overwrite(app_env):
    client, bus, app = app_env
    location = "file:///models/terms"
    app.state.jobs.register_model(
        "terms", {"name": "terms", "job_id": "terms-1", "location": location}
    )
    response = client.post("/v1/jobs", json={"name": "terms"})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "field 'publish.model_name': a model named 'terms' is already published by job "
        f"terms-1 ({location}); set publish.overwrite: true to replace it, or choose another "
        "publish.model_name"
    )
    assert _queued(bus, "dataprep", wait=1.0) is None and app.state.jobs.page() == ([], False)
    renamed = {"name": "terms", "publish": {"model_name": "terms-v2"}}
    assert client.post("/v1/jobs", json=renamed).status_code == 201
    replacing = {"name": "terms", "publish": {"overwrite": True}}
    assert client.post("/v1/jobs", json=replacing).status_code == 201


def test_a_name_a_job_not_ended_is_to_publish_is_refused_at_submission(app_env):
    """Without overwrite, the second job would train only to be refused at publish."""
    client, _, app = app_env
    first = client.post("/v1/jobs", json={"name": "glossary", "publish": {"model_name": "terms"}})
    assert first.status_code == 201
    first_id = first.json()["id"]
    for clash in ({"name": "terms"}, {"name": "other", "publish": {"model_name": "terms"}}):
        response = client.post("/v1/jobs", json=clash)
        assert response.status_code == 409
        assert response.json()["detail"] == (
            f"field 'publish.model_name': job {first_id} is to publish a model named 'terms' "
            "and has not ended; set publish.overwrite: true to replace its model once it has, "
            "or choose another publish.model_name"
        )
    assert [job["id"] for job in app.state.jobs.page()[0]] == [first_id]
    replacing = {"name": "terms", "publish": {"overwrite": True}}
    assert client.post("/v1/jobs", json=replacing).status_code == 201
    assert client.post("/v1/jobs", json={"name": "glossary"}).status_code == 201  # its job name
    # the jobs to publish as "terms" end: the name is free again
    for job in app.state.jobs.page()[0]:
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert client.post("/v1/jobs", json={"name": "terms"}).status_code == 201


def test_a_body_saying_a_key_twice_is_refused_naming_it(app_env):
    """json.loads keeps the last of two equal keys: this job would train 3 epochs."""
    client, bus, app = app_env
    body = '{"name": "terms", "training": {"epochs": 1, "epochs": 3}}'
    headers = {"Content-Type": "application/json"}
    response = client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": ["body", "training", "epochs"],
            "msg": "the key 'epochs' a second time in one object: say each key once",
            "type": "repeated_key",
        }
    ]
    assert _queued(bus, "dataprep", wait=1.0) is None and app.state.jobs.page() == ([], False)
    asked = client.post(
        "/v1/models/terms/invoke", content='{"prompt": "a", "prompt": "b"}', headers=headers
    )
    assert asked.status_code == 422 and asked.json()["detail"][0]["loc"] == ["body", "prompt"]
    once = client.post("/v1/jobs", content=body.replace('"epochs": 1, ', ""), headers=headers)
    assert once.status_code == 201


def test_unknown_job_and_model_are_404(app_env):
    client, _, _ = app_env
    assert client.get("/v1/jobs/nope-1").status_code == 404
    assert client.get("/v1/jobs/nope-1/report").status_code == 404
    response = client.post("/v1/models/nope/invoke", json={"prompt": "What is x"})
    assert response.status_code == 404
    assert "no published model 'nope'" in response.json()["detail"]


def test_invoke_request_is_validated(app_env):
    client, _, _ = app_env
    response = client.post("/v1/models/x/invoke", json={"prompt": "", "max_gen_len": 0})
    assert response.status_code == 422


def test_production_refuses_to_start_without_key(tmp_path):
    settings = ApiSettings(var_dir=tmp_path, broker_url="memory://", environment="production")
    with pytest.raises(SystemExit, match="TERMTUNE_API_KEY must be set"):
        create_app(settings)


def test_invoke_answers_in_bedrock_shape(app_env, published):
    client, _, app = app_env
    ctx, _, event = published
    store = app.state.jobs.store
    store.upload_dir(ctx.store.path(ctx.store.key_of(event.location)), "jobs/j/publish/model")
    app.state.jobs.register_model(
        "tuned", {"name": "tuned", "target": "local", "location": store.uri("jobs/j/publish/model")}
    )
    response = client.post(
        "/v1/models/tuned/invoke", json={"prompt": "What is Asthma", "max_gen_len": 6}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "generation",
        "prompt_token_count",
        "generation_token_count",
        "stop_reason",
    }
    assert 1 <= body["generation_token_count"] <= 6
    assert body["prompt_token_count"] > 1
    assert body["stop_reason"] in ("stop", "length")


def test_report_page_is_served(app_env):
    client, _, app = app_env
    jobs = app.state.jobs
    from shared.jobspec import JobSpec

    jobs.create("terms-1", JobSpec(name="terms"))
    assert client.get("/v1/jobs/terms-1/report.html").status_code == 404
    jobs.store.put_bytes("jobs/terms-1/evaluate/report.html", b"<!doctype html><h1>r</h1>")
    response = client.get("/v1/jobs/terms-1/report.html")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>r</h1>" in response.text


def test_cancel_marks_the_job_and_refuses_ended_jobs(app_env):
    from shared.messages import JobCancelled, StageStarted

    client, _, app = app_env
    job = client.post("/v1/jobs", json={"name": "terms"}).json()
    app.state.jobs.record(StageStarted(job_id=job["id"], stage="prepare", worker="w"))
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    assert response.json()["status"] == "running"  # the running stage stops itself
    assert app.state.jobs.cancel_requested(job["id"])
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 202  # idempotent
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events].count("CancelRequested") == 1

    app.state.jobs.record(JobCancelled(job_id=job["id"], stage="prepare"))
    ended = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert ended.status_code == 409 and "already ended (cancelled)" in ended.json()["detail"]
    assert client.post("/v1/jobs/nope-1/cancel").status_code == 404


def test_cancelling_a_queued_job_ends_it_at_once_and_its_command_runs_nothing(app_env, tmp_path):
    from services.dataprep.handler import handle
    from shared.worker import StageContext, run_stage

    client, bus, app = app_env
    job = client.post("/v1/jobs", json={"name": "terms"}).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["stages"]["prepare"]["status"] == "cancelled"
    assert [cancelled["stages"][s]["status"] for s in ("train", "evaluate", "publish")] == [
        "skipped"
    ] * 3
    # the queued command, delivered later, starts nothing and records nothing
    command = _queued(bus, "dataprep")
    jobs = app.state.jobs
    before = len(jobs.events(job["id"]))
    ctx = StageContext(store=jobs.store, jobs=jobs, settings=app.state.settings)
    event = run_stage(command, handle, ctx)
    assert event.type == "JobCancelled"
    assert len(jobs.events(job["id"])) == before
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def _frames(text):
    return [f for f in text.split("\n\n") if f.strip()]


def test_events_stream_live_until_the_job_ends(app_env):
    import threading
    import time

    from shared.messages import JobCancelled, StageStarted

    client, _, app = app_env
    jobs = app.state.jobs
    job = client.post("/v1/jobs", json={"name": "terms"}).json()

    def later():
        time.sleep(1.2)
        jobs.record(StageStarted(job_id=job["id"], stage="prepare", worker="w"))
        time.sleep(1.2)
        jobs.record(JobCancelled(job_id=job["id"], stage="prepare"))

    threading.Thread(target=later, daemon=True).start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    frames = _frames(body)
    kinds = [
        line.split(": ", 1)[1]
        for f in frames
        for line in f.splitlines()
        if line.startswith("event: ")
    ]
    assert kinds == ["JobSubmitted", "StageStarted", "JobCancelled", "end"]
    ids = [
        line.split(": ", 1)[1] for f in frames for line in f.splitlines() if line.startswith("id: ")
    ]
    assert ids == ["1", "2", "3"]  # each event's sequence number
    # A client that reconnects with the last id it saw gets only what followed it.
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": "2"}
    ) as r:
        resumed = _frames(r.read().decode())
    assert [f.splitlines()[0] for f in resumed] == ["event: JobCancelled", "event: end"]
    page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": 1, "limit": 1}).json()
    assert [e["seq"] for e in page["data"]] == [2] and page["has_more"] and page["last_seq"] == 2


def test_events_stream_of_unknown_job_is_404(app_env):
    client, _, _ = app_env
    assert client.get("/v1/jobs/nope-1/events/stream").status_code == 404


def test_jobs_are_paged_newest_first(app_env):
    client, _, _ = app_env
    ids = [client.post("/v1/jobs", json={"name": f"page{n}"}).json()["id"] for n in range(5)]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    assert first["has_more"] and first["next_after"] == ids[3]
    second = client.get("/v1/jobs", params={"limit": 2, "after": first["next_after"]}).json()
    assert [j["id"] for j in second["data"]] == ids[::-1][2:4]
    last = client.get("/v1/jobs", params={"limit": 2, "after": second["next_after"]}).json()
    assert [j["id"] for j in last["data"]] == [ids[0]]
    assert not last["has_more"] and last["next_after"] is None
    assert client.get("/v1/jobs", params={"after": "nope-1"}).status_code == 404


def test_retry_resumes_a_failed_job_from_its_first_unfinished_stage(app_env):
    from shared.messages import DatasetPrepared, JobCancelled, StageFailed

    client, bus, app = app_env
    jobs = app.state.jobs
    job = client.post("/v1/jobs", json={"name": "retry"}).json()
    _queued(bus, "dataprep")
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # still queued
    manifest = jobs.write_manifest(job["id"], "prepare", {"counts": {"train": 1}})
    jobs.record(DatasetPrepared(job_id=job["id"], manifest=manifest, counts={"train": 1}))
    jobs.record(
        StageFailed(
            job_id=job["id"], stage="train", error="node lost", error_type="X", permanent=False
        )
    )
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"
    response = client.post(f"/v1/jobs/{job['id']}/retry")
    assert response.status_code == 202, response.text
    retried = response.json()
    assert retried["status"] == "queued" and retried["error"] is None and retried["retries"] == 1
    assert retried["stages"]["prepare"]["status"] == "succeeded"
    assert retried["stages"]["train"] == {"status": "pending"}
    command = _queued(bus, "trainer")
    assert command.type == "TrainModel"
    assert command.dataset_manifest == manifest
    # A cancelled job is retried too, and its cancel request is forgotten.
    jobs.request_cancel(job["id"])
    jobs.record(JobCancelled(job_id=job["id"], stage="train"))
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 202
    assert not jobs.cancel_requested(job["id"])
    assert client.post("/v1/jobs/nope-1/retry").status_code == 404


def test_metrics_count_requests_and_jobs_in_prometheus_format(app_env):
    from prometheus_client.parser import text_string_to_metric_families

    client, _, _ = app_env
    client.post("/v1/jobs", json={"name": "metered"})
    client.get("/v1/jobs/nope-1")
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("termtune_jobs", (("status", "queued"),))] == 1
    assert (
        samples[
            (
                "termtune_http_requests_total",
                (("method", "POST"), ("route", "/v1/jobs"), ("status", "201")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "termtune_http_requests_total",
                (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")),
            )
        ]
        == 1
    )


def test_request_bodies_over_the_limit_are_refused_with_413(app_env):
    client, bus, _ = app_env
    huge = {"name": "big", "dataset": {"source": "x" * 2_000_000}}
    response = client.post("/v1/jobs", json=huge)
    assert response.status_code == 413
    assert response.json() == {
        "detail": "request body over 1048576 bytes",
        "type": "RequestTooLarge",
    }

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(40):
            yield b"x" * 65536

    streamed = client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert _queued(bus, "dataprep", wait=1.0) is None


def test_estimate_prices_a_prepared_job_on_a_g5_instance(app_env, trained_job):
    """From the prepared dataset's token counts: steps, tokens, hours, cost; Bedrock's cost."""
    import math

    client, _, app = app_env
    ctx, job_id = trained_job["ctx"], trained_job["job_id"]
    jobs = app.state.jobs
    spec = ctx.jobs.spec(job_id)
    dataset = ctx.jobs.manifest(job_id, "prepare")
    jobs.create("est-1", spec)
    jobs.write_manifest("est-1", "prepare", dataset)
    bigger = spec.model_dump(mode="json")
    bigger["training"].update(max_steps=-1, epochs=3, batch_size=4, gradient_accumulation_steps=2)
    one = client.post("/v1/estimate", json={"job_id": "est-1", "spec": bigger}).json()
    four = client.post(
        "/v1/estimate", json={"job_id": "est-1", "spec": bigger, "instance_type": "g5.12xlarge"}
    ).json()
    rows = dataset["counts"]["train"]
    assert one["training"]["optimizer_steps"] == math.ceil(math.ceil(rows / 8) * 3)
    assert four["processes"] == 4  # data-parallel on the four GPUs: a quarter of the steps
    assert four["training"]["optimizer_steps"] == math.ceil(math.ceil(rows / 32) * 3)
    # each figure rounded to a whole token/s
    assert abs(four["training"]["tokens_per_s"] - 4 * one["training"]["tokens_per_s"]) <= 4
    assert one["training"]["cost_usd"] == round(one["training"]["hours"] * 1.006, 2)
    assert one["bedrock"]["custom_model_units"] == 1
    assert "assumed" in one["training"]["basis"] and "assumed" in one["bedrock"]["basis"]
    bad = client.post("/v1/estimate", json={"job_id": "est-1", "instance_type": "p5.48xlarge"})
    assert bad.status_code == 422 and "g5.xlarge" in bad.json()["detail"]
    assert client.post("/v1/estimate", json={"job_id": "nope-1"}).status_code == 404
    jobs.create("est-2", spec)
    assert client.post("/v1/estimate", json={"job_id": "est-2"}).status_code == 409


def test_job_ids_no_job_can_have_are_404_not_500(app_env):
    client, _, _ = app_env
    assert client.post("/v1/estimate", json={"job_id": "\u0000"}).status_code == 404
    assert client.post("/v1/estimate", json={"job_id": ".."}).status_code == 404
    assert client.get("/v1/jobs/..").status_code in (404, 307)
    assert client.get("/v1/jobs/a%00b").status_code == 404
    assert client.post("/v1/jobs/a%0Ab/retry").status_code == 404


def test_metrics_labels_stay_bounded_under_made_up_methods(app_env):
    client, _, _ = app_env
    for n in range(30):
        client.request(f"BREW{n}", "/v1/jobs")
    text = client.get("/metrics").text
    assert "BREW" not in text
    assert 'method="OTHER"' in text


def test_responses_carry_security_headers_and_the_page_a_strict_policy(app_env):
    import base64
    import hashlib
    import re

    from services.api.routes.web import PAGE

    client, _, _ = app_env
    for response in (
        client.get("/ui"),
        client.get("/v1/jobs"),
        client.get("/v1/jobs", headers={"Authorization": ""}),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    policy = client.get("/ui").headers["content-security-policy"]
    [script] = re.findall(r"<script>(.*?)</script>", PAGE.read_text(), flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy  # the page's own script and no other
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy


def test_a_key_in_the_url_is_refused_and_never_logged(app_env, caplog):
    import logging

    from services.api.middleware import RedactSecrets

    client, _, _ = app_env
    response = client.get(f"/v1/jobs?api_key={KEY}", headers={"Authorization": ""})
    assert response.status_code == 401
    assert "API keys in the URL are refused" in response.json()["detail"]
    assert client.get(f"/healthz?key={KEY}").status_code == 401  # on every path
    assert client.get("/v1/jobs?monkey=1").status_code == 200  # a name that only ends in key
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", f"/v1/jobs?limit=5&token={KEY}", "1.1", 401),
        None,
    )
    RedactSecrets().filter(record)
    assert KEY not in record.getMessage()
    assert "/v1/jobs?limit=5&token=[redacted]" in record.getMessage()


def test_a_development_key_is_written_owner_only_and_never_logged(tmp_path, caplog):
    import logging
    import stat

    from services.api.main import resolve_api_key

    settings = ApiSettings(var_dir=tmp_path, broker_url="memory://")
    with caplog.at_level(logging.WARNING):
        key = resolve_api_key(settings)
    key_file = tmp_path / "run" / "api_key"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in caplog.text and str(key_file) in caplog.text
    assert resolve_api_key(settings) == key  # the same key for the next start


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_invoke_refuses_non_finite_numbers(app_env, value):

    client, _, _ = app_env
    body = json.dumps({"prompt": "What is Asthma", "temperature": value})  # NaN / Infinity
    response = client.post(
        "/v1/models/anything/invoke", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "temperature" in response.text


def test_a_dataset_location_its_policy_forbids_is_refused_at_submission(app_env):
    client, bus, app = app_env
    spec = {"name": "terms", "dataset": {"source": "s3://someone-elses-bucket/terms.jsonl"}}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "dataset.source: 's3://someone-elses-bucket/terms.jsonl' is outside the object store "
        "and the allowed buckets: none (TERMTUNE_ALLOWED_BUCKETS)"
    )
    assert _queued(bus, "dataprep", wait=1.0) is None and app.state.jobs.page() == ([], False)


def test_a_submission_while_the_broker_is_down_runs_once_it_is_back(app_env):
    from shared.outbox import pending, relay_once

    client, bus, app = app_env
    real = bus.publish
    bus.publish = lambda *a, **k: (_ for _ in ()).throw(ConnectionRefusedError("broker down"))
    response = client.post("/v1/jobs", json={"name": "terms"})
    assert response.status_code == 201 and response.json()["status"] == "queued"
    time.sleep(0.5)  # the relay tried, and kept the command
    assert pending(app.state.jobs) == 1
    bus.publish = real
    relay_once(app.state.jobs, bus)  # what the relay's next pass does
    command = _queued(bus, "dataprep")
    assert command.job_id == response.json()["id"] and pending(app.state.jobs) == 0


def test_a_base_model_bedrock_does_not_import_or_out_of_its_format_is_refused_at_submission(
    app_env, tmp_path
):
    from services.cli.tinycausal import build_tiny_causal
    from tests.factories import SAMPLE_DATA

    client, bus, app = app_env
    oss = build_tiny_causal("gpt_oss", tmp_path / "gpt-oss", data_file=SAMPLE_DATA, hidden=32)
    accepted = client.post("/v1/jobs", json={"name": "terms", "base_model": str(oss)})
    assert accepted.status_code == 201  # GPT-OSS, in its chat template
    assert _queued(bus, "dataprep") is not None
    plain = {"name": "terms", "base_model": str(oss), "dataset": {"chat_template": "none"}}
    response = client.post("/v1/jobs", json=plain)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        f"base_model {str(oss)!r} is a GPT-OSS model, which answers only in the format its "
        "chat template writes, and dataset.chat_template is none: set it to auto"
    )
    (oss / "config.json").write_text('{"model_type": "bert"}')
    response = client.post("/v1/jobs", json={"name": "terms", "base_model": str(oss)})
    assert (
        response.status_code == 422
        and "family Bedrock Custom Model Import does not take" in (response.json()["detail"])
    )
    assert len(app.state.jobs.page()[0]) == 1  # the refused ones recorded nothing


def test_cancelling_a_job_between_stages_ends_its_mlflow_run(tmp_path, mlflow_server):
    from shared.tracking import mlflow_run

    settings = ApiSettings(
        var_dir=tmp_path, broker_url="memory://", api_key=KEY,
        exchange=f"t{uuid.uuid4().hex[:8]}", mlflow_tracking_uri=mlflow_server.uri,
    )  # fmt: skip
    with TestClient(create_app(settings, bus=Bus(settings))) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        spec = {"name": "tracked", "tracking": {"backend": "mlflow"}}
        job = client.post("/v1/jobs", json=spec).json()
        jobs = client.app.state.jobs
        run = mlflow_run.open_run(job["id"], jobs.spec(job["id"]), settings)  # as training does
        assert run.client.get_run(run.run_id).info.status == "RUNNING"
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        assert run.client.get_run(run.run_id).info.status == "KILLED"


def test_estimate_charges_a_decoder_only_model_every_token_through_the_whole_stack(
    app_env, trained_qwen, tiny_qwen
):
    from shared.trainplan import model_shape

    client, _, app = app_env
    ctx = trained_qwen["ctx"]
    app.state.jobs.create("est-q", ctx.jobs.spec("qwen-job"))
    dataset = ctx.jobs.manifest("qwen-job", "prepare")
    app.state.jobs.write_manifest("est-q", "prepare", dataset)
    answer = client.post("/v1/estimate", json={"job_id": "est-q"}).json()
    weights = model_shape(str(tiny_qwen)).decoder_matmul_parameters
    tokens = sum(dataset["tokens"]["train"][side]["mean"] for side in ("source", "target"))
    assert (
        f"4 x the model's {weights:,} weights x {tokens:.0f} prompt and answer tokens"
        in (answer["training"]["basis"])
    )
    assert "encoder" not in answer["training"]["basis"]


def test_event_numbers_past_the_databases_integers_are_refused_naming_the_parameter(app_env):
    """``after=10**30`` was a 500 (SQLite's OverflowError; PostgreSQL's 32-bit event numbers
    from 2**31 on), in the stream's ``after`` and ``Last-Event-ID`` too."""
    client, _, _ = app_env
    job = client.post("/v1/jobs", json={"name": "terms"}).json()
    events = f"/v1/jobs/{job['id']}/events"
    for huge in [str(10**30), str(2**31)]:
        _refused_naming_the_parameter(client, events, huge)
    last = client.get(events, params={"after": 2**31 - 1}).json()
    assert last["data"] == [] and last["last_seq"] == 2**31 - 1


def _refused_naming_the_parameter(client, events, huge):
    for path, params, headers, where in [
        (events, {"after": huge}, {}, ["query", "after"]),
        (f"{events}/stream", {"after": huge}, {}, ["query", "after"]),
        (f"{events}/stream", {}, {"Last-Event-ID": huge}, ["header", "last-event-id"]),
    ]:
        response = client.get(path, params=params, headers=headers)
        assert response.status_code == 422, (path, response.text)
        assert [e["loc"] for e in response.json()["detail"]] == [where]


def test_two_retries_at_once_resume_the_job_once(app_env, monkeypatch):
    """The retry's status check read outside the transaction that recorded it: two retries
    at once both passed it (two JobRetried, two commands)."""
    import threading

    from shared.messages import StageFailed

    client, bus, app = app_env
    jobs = app.state.jobs
    job = client.post("/v1/jobs", json={"name": "retry"}).json()
    _queued(bus, "dataprep")
    jobs.record(StageFailed(job_id=job["id"], stage="prepare", error="x", error_type="X"))
    both_checked = threading.Barrier(2, timeout=10)
    resume = jobs.resume_command

    def resume_command(job_id):  # both requests have read the job as failed by now
        both_checked.wait()
        return resume(job_id)

    monkeypatch.setattr(jobs, "resume_command", resume_command)
    codes = []

    def retry():
        codes.append(client.post(f"/v1/jobs/{job['id']}/retry").status_code)

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [202, 409]
    assert [e.type for e in jobs.events(job["id"])].count("JobRetried") == 1
    assert _queued(bus, "dataprep") is not None and _queued(bus, "dataprep", wait=0.5) is None
    monkeypatch.undo()
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # queued now


def test_deleting_a_model_leaves_the_entry_another_job_published_meanwhile(app_env):
    """The delete reads the entry, deletes its Bedrock import, then forgets the name: an
    overwrite publish in between was forgotten with it, and its import orphaned."""
    client, _, app = app_env
    jobs = app.state.jobs
    first = {"name": "terms", "job_id": "a", "target": "bedrock", "location": "file:///a",
             "bedrock": {"imported_model_arn": "arn:a"}}  # fmt: skip
    jobs.register_model("terms", first)

    class Imported:  # Bedrock deletes job a's import; job b publishes the name meanwhile
        def delete(self, entry):
            second = {**first, "job_id": "b", "bedrock": {"imported_model_arn": "arn:b"}}
            jobs.register_model("terms", second, overwrite=True)
            return entry["bedrock"]["imported_model_arn"]

    app.state.bedrock = Imported()
    deleted = client.delete("/v1/models/terms")
    assert deleted.status_code == 409 and "the new one stays" in deleted.json()["detail"]
    assert client.get("/v1/models/terms").json()["job_id"] == "b"


def test_a_job_between_stages_is_cancelled_at_once(app_env):
    """Data-prep done, its TrainModel waiting for a busy trainer: the cancel only asked the
    job to stop, and nothing ran to stop it; it stayed running (for hours, or for good with
    no trainer), and a retry was refused. A stage whose worker holds its lease but has not
    recorded its start yet is left to stop itself."""
    from shared.leases import Lease
    from shared.messages import DatasetPrepared, StageStarted

    client, _, app = app_env
    jobs = app.state.jobs
    ids = []
    for n in range(2):
        job_id = client.post("/v1/jobs", json={"name": f"terms-{n}"}).json()["id"]
        jobs.record(StageStarted(job_id=job_id, stage="prepare", worker="w", attempt=1))
        manifest = jobs.write_manifest(job_id, "prepare", {"counts": {"train": 1}})
        jobs.record(DatasetPrepared(job_id=job_id, manifest=manifest, counts={"train": 1}))
        ids.append(job_id)
    waiting, taken = ids
    assert Lease(jobs.ledger, taken, "train", owner="trainer-1", ttl=60).acquire()
    cancelled = client.post(f"/v1/jobs/{waiting}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["stages"]["train"]["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{waiting}/retry").status_code == 202
    asked = client.post(f"/v1/jobs/{taken}/cancel").json()
    assert asked["status"] == "running" and asked["cancel_requested"] is True
