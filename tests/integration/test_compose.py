"""docker-compose.yml's services as processes over a real RabbitMQ and the S3 protocol.

Each service runs the command and environment its compose entry and image give it
(tests/integration/compose.py lists the few translations a single machine needs); jobs go
end to end over AMQP and S3, not the embedded defaults. Two trainer instances train two
jobs at once, as ``docker compose up --scale trainer=2`` would.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import boto3
import httpx
import pytest

from tests.factories import SAMPLE_DATA, assert_trained_at_once, spec_dict, wait_for_job
from tests.integration import compose
from tests.integration.conftest import RABBITMQ_PASSWORD, RABBITMQ_USER, free_port

pytestmark = pytest.mark.e2e
API_KEY = "integration-api-key"


@pytest.fixture(scope="module")
def stack(rabbitmq, s3_endpoint, postgres, tmp_path_factory):
    """The compose services (two trainers) on RabbitMQ, PostgreSQL and the S3 server; an API
    client."""
    database = postgres.fresh_database().split("@", 1)[1]  # host:port/name
    variables = {
        "POSTGRES_PASSWORD": "unused-locally",  # the tests' server trusts loopback
        "RABBITMQ_USER": RABBITMQ_USER,
        "RABBITMQ_PASSWORD": RABBITMQ_PASSWORD,
        "S3_ACCESS_KEY": "test",
        "S3_SECRET_KEY": "test-secret",
        "TERMTUNE_BUCKET": "termtune-it",
        "TERMTUNE_API_KEY": API_KEY,
        "TERMTUNE_API_PORT": "8000",
    }
    key = tmp_path_factory.mktemp("s3-credentials") / "credentials"  # as s3-init writes it
    key.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
    services = compose.service_processes(
        variables, amqp=rabbitmq, s3=s3_endpoint, database=database, s3_key=key
    )
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="termtune-it")  # what compose's s3-init does
    s3.upload_file(str(SAMPLE_DATA), "termtune-it", "termtune/datasets/medical_terms.jsonl")
    base = tmp_path_factory.mktemp("compose")
    port = free_port()
    with ExitStack() as stack:
        procs = {}
        for name, instance in [(n, 1) for n in compose.WORKERS] + [("trainer", 2)]:
            key = f"{name}-{instance}"
            procs[key] = compose.start(
                services[name], base / key, port=port if name == "api" else None
            )
            stack.callback(_stop, procs[key])
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        _wait_ready(client, procs, base)
        yield {"client": client, "services": services, "s3": s3, "procs": procs, "base": base}


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=40)
    except Exception:  # noqa: BLE001 - the test is over: make sure it is gone
        proc.kill()


def _logs(base) -> str:
    return "\n".join(
        f"--- {p.parent.name}\n" + p.read_text(errors="replace")[-1500:]
        for p in sorted(base.glob("*/service.log"))
    )


def _wait_ready(client, procs, base):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dead = [k for k, p in procs.items() if p.poll() is not None]
        assert not dead, f"services exited: {dead}\n{_logs(base)}"
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the API never became ready\n{_logs(base)}")


def _spec(tiny_model, name, **training):
    spec = spec_dict(tiny_model, name=name, training=training or {"max_steps": 6})
    spec["dataset"]["source"] = "s3://termtune-it/termtune/datasets/medical_terms.jsonl"
    return spec


def _wait(client, job_id, base, timeout=400):
    return wait_for_job(client, job_id, timeout=timeout, describe=lambda: _logs(base))


def test_the_services_use_the_deployment_broker_and_store(stack):
    trainer = stack["services"]["trainer"].env
    assert trainer["TERMTUNE_BROKER_URL"].startswith(f"amqp://{RABBITMQ_USER}:")
    assert trainer["TERMTUNE_STORE_URL"] == "s3://termtune-it/termtune"
    assert trainer["TERMTUNE_ENVIRONMENT"] == "production"
    assert stack["services"]["api"].command == ["python", "-m", "services.api"]


def test_a_job_goes_end_to_end_over_amqp_and_s3(stack, tiny_model):
    client, base = stack["client"], stack["base"]
    created = client.post("/v1/jobs", json=_spec(tiny_model, "it-one"))
    assert created.status_code == 201, created.text
    job = _wait(client, created.json()["id"], base)
    assert job["status"] == "succeeded", f"{job}\n{_logs(base)}"
    keys = [
        o["Key"]
        for o in stack["s3"]
        .list_objects_v2(Bucket="termtune-it", Prefix=f"termtune/jobs/{job['id']}/")
        .get("Contents", [])
    ]
    for stage in ("prepare", "train", "evaluate", "publish"):
        assert f"termtune/jobs/{job['id']}/{stage}/manifest.json" in keys
    answer = client.post("/v1/models/it-one/invoke", json={"prompt": "What is Asthma?"})
    assert answer.status_code == 200 and "generation" in answer.json()
    # Nothing went through a local folder store: the services' var folders hold no store.
    assert not list(base.glob("*/var/store"))


def test_two_trainer_instances_train_two_jobs_at_once(stack, tiny_model):
    client, base = stack["client"], stack["base"]
    ids = [
        client.post(
            "/v1/jobs", json=_spec(tiny_model, f"it-pair-{n}", max_steps=20, logging_steps=5)
        ).json()["id"]
        for n in range(2)
    ]
    jobs = [_wait(client, job_id, base) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 2, _logs(base)
    assert_trained_at_once(client, ids)
