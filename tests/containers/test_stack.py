"""``docker compose up``, for real: every image built from its Dockerfile, the whole stack in
a real Docker engine, the example job submitted through the published API port.

Runs under ``make test-compose`` (TERMTUNE_TEST_CONTAINERS=1), apart from ``make test``:
building the images takes minutes. Only the upstream base images are stand-ins
(tests/containers/engine.py says why and how they are built). The figures it prints (image
sizes, build time, the time from ``docker compose up`` to a published model) are the ones
deploy/README.md quotes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import yaml

from tests.containers import engine
from tests.factories import assert_trained_at_once, wait_for_job

if os.environ.get("TERMTUNE_TEST_CONTAINERS") != "1":
    pytest.skip(
        "the real-container tests run under `make test-compose` (a Docker engine, ~15 min)",
        allow_module_level=True,
    )

ROOT = engine.ROOT
PROJECT = "termtune-test"
IMAGES = [f"termtune/{s}:0.1.0" for s in ("api", "dataprep", "evaluator", "publisher")]
IMAGES += ["termtune/trainer-cpu:0.1.0", "termtune/mlflow:0.1.0"]
FIGURES: dict[str, Any] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The images built and the stack up (one trainer); torn down with its volumes."""
    problem = engine.engine_problem()
    if problem:
        pytest.fail(f"make test-compose needs a Docker engine: {problem}")
    engine.reclaim()
    problem = engine.disk_problem()
    if problem:
        pytest.fail(f"make test-compose: {problem}")
    folder = tmp_path_factory.mktemp("compose")
    key = secrets.token_urlsafe(24)
    port = 8000  # the README's command names the default port
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail("port 8000 is taken: the stack publishes its API there, as documented")
    env_file = folder / ".env"
    variables = {
        "RABBITMQ_PASSWORD": secrets.token_urlsafe(16),
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "S3_SECRET_KEY": secrets.token_urlsafe(16),
        "TERMTUNE_API_KEY": key,
        "TERMTUNE_API_PORT": str(port),
        "TERMTUNE_S3_PORT": str(_free_port()),
        "TERMTUNE_S3_CONSOLE_PORT": str(_free_port()),
        # Every job tracked in the stack's MLflow server (its UI on a free loopback port).
        "TERMTUNE_TRACKING": "mlflow",
        "TERMTUNE_MLFLOW_PORT": str(_free_port()),
        "TERMTUNE_PROMETHEUS_PORT": str(_free_port()),
        # A bucket datasets may come from: s3-init lets the services' key read it.
        "TERMTUNE_ALLOWED_BUCKETS": f"datasets-{secrets.token_hex(4)}",
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    wheelhouse = engine.fill_wheelhouse(engine.CACHE / "wheelhouse")
    with engine.serve(wheelhouse) as url:
        engine.build_standins(url)
        compose = engine.Compose(PROJECT, env_file, {"TERMTUNE_WHEELHOUSE_URL": url})
        compose("down", "-v", "--remove-orphans", check=False)
        started = time.monotonic()
        compose("build", timeout=5400)
        FIGURES["build_s"] = round(time.monotonic() - started)
    FIGURES["image_mb"] = {image: round(engine.image_size_mb(image)) for image in IMAGES}
    try:
        started = time.monotonic()
        compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=900)
        FIGURES["up_to_healthy_s"] = round(time.monotonic() - started, 1)
        yield {
            "compose": compose,
            "url": f"http://127.0.0.1:{port}",
            "key": key,
            "up_started": started,
            "folder": folder,
            "mlflow": f"http://127.0.0.1:{variables['TERMTUNE_MLFLOW_PORT']}",
            "prometheus": f"http://127.0.0.1:{variables['TERMTUNE_PROMETHEUS_PORT']}",
            "s3": f"http://127.0.0.1:{variables['TERMTUNE_S3_PORT']}",
            "s3_admin": ("termtune", variables["S3_SECRET_KEY"]),  # S3_ACCESS_KEY's default
            "datasets_bucket": variables["TERMTUNE_ALLOWED_BUCKETS"],
        }
    finally:
        print(json.dumps(FIGURES, indent=2))
        compose("down", "-v", "--remove-orphans", check=False, timeout=600)
        engine.reclaim()  # this build's superseded images: repeated runs do not fill the disk


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, stack: dict[str, Any]) -> Iterator[None]:
    """Every container's log when a test failed."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack["compose"].logs())


def termtune(stack: dict[str, Any], *args: str, timeout: float = 900) -> str:
    """The host's `termtune` against the stack's published API port; its stdout."""
    done = subprocess.run(
        [str(ROOT / ".venv/bin/termtune"), *args],
        cwd=ROOT,
        env={**os.environ, "TERMTUNE_API_URL": stack["url"], "TERMTUNE_API_KEY": stack["key"]},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"termtune {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def client(stack: dict[str, Any]) -> httpx.Client:
    return httpx.Client(
        base_url=stack["url"], headers={"Authorization": f"Bearer {stack['key']}"}, timeout=60
    )


def test_every_service_is_healthy_and_its_check_answers_at_once(stack):
    out = stack["compose"]("ps", "--format", "json").stdout
    states = [json.loads(line) for line in out.splitlines() if line.strip()]
    termtune_services = {"api", "dataprep", "trainer", "evaluator", "publisher"}
    seen = {s["Service"]: s for s in states}
    assert termtune_services <= set(seen), seen.keys()
    for name in termtune_services | {"rabbitmq", "postgres", "s3", "mlflow", "prometheus"}:
        assert seen[name]["Health"] == "healthy", seen[name]
    for name in termtune_services - {"api"}:
        health = json.loads(
            engine.run(
                ["docker", "inspect", "-f", "{{json .State.Health}}", seen[name]["Name"]]
            ).stdout
        )
        durations = [
            (_time(h["End"]) - _time(h["Start"])) for h in health["Log"] if h["ExitCode"] == 0
        ]
        assert durations and max(durations) < 1.0, (name, health["Log"])


def _time(text: str) -> float:
    """Docker's RFC 3339 timestamps (nanoseconds) as seconds."""
    head, _, rest = text.partition(".")
    fraction = rest.rstrip("Z").split("+")[0].split("-")[0]
    return datetime.fromisoformat(head).timestamp() + float(f"0.{fraction}")


def readme_upload_line() -> str:
    """README.md's command that submits the example to a deployed stack."""
    lines = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if "termtune submit examples/medical-terms.yaml --upload" in line
        and "TERMTUNE_API_URL" in line
    ]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_example_job_publishes_and_its_model_answers(stack):
    """The README's line, run as written (with bash, from the repository) against the stack."""
    done = subprocess.run(
        ["bash", "-c", readme_upload_line()],
        cwd=ROOT,
        env={**os.environ, "TERMTUNE_API_KEY": stack["key"]},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "uploaded data/medical_terms.jsonl" in done.stderr
    assert "uploaded var/models/tiny-flan-t5" in done.stderr
    out = done.stdout
    FIGURES["up_to_published_s"] = round(time.monotonic() - stack["up_started"])
    job = client(stack).get(f"/v1/jobs/{out.split()[0]}").json()
    assert job["status"] == "succeeded", job
    report = client(stack).get(f"/v1/jobs/{job['id']}/report").json()
    assert report["gate"]["passed"], report["gate"]
    answer = json.loads(termtune(stack, "invoke", "medical-terms", "What is Asthma?"))
    assert answer["generation"].strip(), f"the published model answered nothing: {answer}"
    _check_the_mlflow_run(stack, job, report)


def _check_the_mlflow_run(stack, job, report):
    """The job's run in the stack's MLflow server (its runs in PostgreSQL, its artifacts in
    the bucket), read through the host's port: the link the web page shows works. From the
    host, artifacts stream through the server: MLflow's presigned download URLs name the S3
    server as the stack's network knows it (http://s3:8333), which the host cannot reach."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"  # as deploy/README says

    ref = job["result"]["train"]["tracking"]
    assert ref["url"].startswith(stack["mlflow"] + "/#/experiments/"), ref
    assert httpx.get(ref["url"], timeout=30).status_code == 200  # the UI answers the link
    mlflow = MlflowClient(stack["mlflow"])
    run = mlflow.get_run(ref["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["termtune.job_id"] == job["id"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the server
    assert mlflow.get_metric_history(ref["run_id"], "train/loss")
    rouge = report["metrics"]["rougeL"]["tuned"]
    assert run.data.metrics["eval/rougeL/tuned"] == pytest.approx(rouge)
    local = stack["folder"] / "mlflow-artifacts"
    local.mkdir(exist_ok=True)
    path = mlflow.download_artifacts(ref["run_id"], "evaluation/report.json", str(local))
    assert json.loads(local.joinpath(path).read_text()) == report  # a file: local/report.json
    registered = job["result"]["publish"]["registered_model"]
    version = mlflow.get_model_version("medical-terms", registered["version"])
    assert version.source == job["result"]["publish"]["location"]  # s3://: not copied
    assert version.source.startswith("s3://termtune/termtune/jobs/")
    assert version.tags["termtune.job_id"] == job["id"]


def _targets(stack) -> list[dict[str, Any]]:
    got = httpx.get(f"{stack['prometheus']}/api/v1/targets", timeout=30).json()
    return got["data"]["activeTargets"]


def _scraped(stack, services: dict[str, int], timeout: float = 120) -> list[dict[str, Any]]:
    """Prometheus's targets once each service has its number of replicas up."""
    deadline = time.monotonic() + timeout
    while True:
        up = [t for t in _targets(stack) if t["health"] == "up"]
        counts = {s: sum(t["labels"]["service"] == s for t in up) for s in services}
        if counts == services or time.monotonic() > deadline:
            assert counts == services, _targets(stack)
            return up
        time.sleep(3)


def _query(stack, query: str, by: str, wanted: set[str]) -> dict[str, float]:
    """The query's values by label ``by``, once ``wanted`` are all there (or a minute on)."""
    deadline = time.monotonic() + 60
    while True:  # the counts of the last scrape (every 15 s)
        got = httpx.get(f"{stack['prometheus']}/api/v1/query", params={"query": query}).json()
        values = {r["metric"][by]: float(r["value"][1]) for r in got["data"]["result"]}
        if set(values) >= wanted or time.monotonic() > deadline:
            assert set(values) >= wanted, got
            return values
        time.sleep(3)


def test_prometheus_scrapes_every_worker_and_the_api_and_sees_the_job(stack):
    """After the example job: each worker and the API (with its key, from compose's secret)
    a target that is up, the stage runs and the API's job requests counted."""
    _scraped(stack, {"dataprep": 1, "trainer": 1, "evaluator": 1, "publisher": 1, "api": 1})
    query = 'sum by (stage) (termtune_stage_duration_seconds_count{outcome="succeeded"})'
    runs = _query(stack, query, "stage", {"prepare", "train", "evaluate", "publish"})
    assert all(n >= 1 for n in runs.values())
    query = 'sum by (route) (termtune_http_requests_total{service="api", status="201"})'
    created = _query(stack, query, "route", {"/v1/jobs"})
    assert created["/v1/jobs"] >= 1  # the example job's submission, counted by the API


def test_two_trainers_train_two_jobs_at_once(stack):
    stack["compose"]("up", "-d", "--wait", "--scale", "trainer=2", timeout=900)
    example = yaml.safe_load((ROOT / "examples/medical-terms.yaml").read_text())
    ids = []
    for n in range(2):
        spec = {
            **example,
            "name": f"pair-{n}",
            "training": {**example["training"], "epochs": 1, "max_steps": 30},
            "publish": {"target": "local", "overwrite": True},
        }
        path = stack["folder"] / f"pair-{n}.yaml"
        path.write_text(yaml.safe_dump(spec))
        ids.append(termtune(stack, "submit", str(path), "--upload").split()[0])
    with client(stack) as http:
        for job_id in ids:
            job = wait_for_job(http, job_id, timeout=900, describe=stack["compose"].logs)
            assert job["status"] == "succeeded", job
        assert_trained_at_once(http, ids)  # two trainer containers, two jobs at once
    # Prometheus found the second trainer by DNS: two trainer targets, both up.
    _scraped(stack, {"dataprep": 1, "trainer": 2, "evaluator": 1, "publisher": 1, "api": 1})


def _s3(stack, service: str, key: tuple[str, str]) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=stack["s3"],
        region_name="us-east-1",
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
    )


def _denied(call, *args, **kwargs) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    assert caught.value.response["Error"]["Code"] in ("AccessDenied", "403"), caught.value


def test_the_services_key_reaches_their_bucket_and_nothing_else(stack):
    """s3-init's key (the one the jobs above ran on) reads and writes the bucket's objects,
    reads the allowed datasets bucket, and nothing else; the admin's secret is in no service;
    s3-init run again keeps the key."""
    compose = stack["compose"]
    path = "/run/termtune-s3/credentials"
    written = compose("exec", "-T", "api", "cat", path).stdout
    app = tuple(re.findall(r"^aws_(?:access_key_id|secret_access_key) = (\S+)$", written, re.M))
    assert len(app) == 2 and app[0] != stack["s3_admin"][0], written
    admin_s3, app_s3 = _s3(stack, "s3", stack["s3_admin"]), _s3(stack, "s3", app)
    other = f"other-{secrets.token_hex(4)}"
    admin_s3.create_bucket(Bucket=other)
    admin_s3.put_object(Bucket=other, Key="private.txt", Body=b"not the app's")
    listed = app_s3.list_objects_v2(Bucket="termtune", Prefix="termtune/jobs/")
    assert listed["KeyCount"] > 0  # the jobs above wrote there with this key
    app_s3.put_object(Bucket="termtune", Key="termtune/probe.txt", Body=b"ok")
    app_s3.delete_object(Bucket="termtune", Key="termtune/probe.txt")
    datasets = stack["datasets_bucket"]
    admin_s3.create_bucket(Bucket=datasets)
    admin_s3.put_object(Bucket=datasets, Key="terms.jsonl", Body=b'{"term": "x"}\n')
    assert app_s3.get_object(Bucket=datasets, Key="terms.jsonl")["Body"].read()
    assert app_s3.list_objects_v2(Bucket=datasets)["KeyCount"] == 1
    _denied(app_s3.put_object, Bucket=datasets, Key="x.txt", Body=b"x")  # read-only
    _denied(app_s3.get_object, Bucket=other, Key="private.txt")
    _denied(app_s3.put_object, Bucket=other, Key="x.txt", Body=b"x")
    _denied(app_s3.list_objects_v2, Bucket=other)
    _denied(app_s3.create_bucket, Bucket=f"made-{secrets.token_hex(4)}")
    _denied(app_s3.delete_bucket, Bucket="termtune")
    _denied(_s3(stack, "iam", app).list_users)
    for name in ("api", "dataprep", "trainer", "evaluator", "publisher", "mlflow"):
        env = compose("exec", "-T", name, "env").stdout
        assert stack["s3_admin"][1] not in env, f"{name} has the S3 admin's secret"
    again = compose("run", "--rm", "-T", "s3-init", timeout=300)
    assert "keeps its key" in again.stdout + again.stderr, again
    assert compose("exec", "-T", "api", "cat", path).stdout == written


def test_compose_down_removes_every_container(stack):
    stack["compose"]("down", timeout=600)
    left = stack["compose"]("ps", "-a", "-q").stdout.split()
    assert left == []
