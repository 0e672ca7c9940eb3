"""The bedrock target through boto3 for real: a local Bedrock stand-in and an S3 server."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid

import boto3
import pytest
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from services.publisher import card, cmi, upload
from services.publisher.handler import handle
from services.publisher.importer import Importer, ImportRecords, plan_import
from shared import bedrock
from shared.errors import (
    BedrockError,
    PreflightError,
    RetryableError,
    StoreUnavailable,
)
from shared.jobspec import parse_spec
from shared.messages import JobCancelled, JobRetried, PublishModel, StageProgress
from shared.settings import BedrockSettings
from shared.stage import run_stage
from tests.standins.bedrock import BedrockStandIn, settings_for

ROLE = "arn:aws:iam::123456789012:role/termtune-bedrock-import"


@pytest.fixture
def standin(s3_endpoint):
    fake = BedrockStandIn(s3_endpoint)
    server = fake.start()
    yield fake
    server.should_exit = True


@pytest.fixture
def bucket(s3_endpoint):
    name = f"imports-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def bedrock_env(monkeypatch, s3_endpoint, standin, bucket):
    env = settings_for(standin, f"s3://{bucket}/models", ROLE)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {k.removeprefix("TERMTUNE_BEDROCK_"): v for k, v in env.items()}


def _bedrock_job(published, job_id: str, model_name: str | None = None):
    """A new job on the published job's artifacts, whose spec publishes to Bedrock."""
    ctx, cmd, _ = published
    data = ctx.spec(cmd).model_dump(mode="json")
    data["publish"] = {"target": "bedrock", "model_name": model_name or f"terms-{job_id}"}
    uri = ctx.jobs.create(job_id, parse_spec(data))
    return ctx, PublishModel(
        job_id=job_id,
        spec_uri=uri,
        dataset_manifest=cmd.dataset_manifest,
        training_manifest=cmd.training_manifest,
        evaluation_manifest=cmd.evaluation_manifest,
    )


def _job_id() -> str:
    return f"br-{uuid.uuid4().hex[:8]}"


def _objects(s3_endpoint, bucket):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_uploads_imports_once_and_smoke_invokes(published, bedrock_env, standin, s3_endpoint):
    ctx, cmd = _bedrock_job(published, _job_id())
    event = handle(cmd, ctx)
    manifest = ctx.jobs.manifest(cmd.job_id, "publish")
    imported = manifest["bedrock"]
    assert event.target == "bedrock" and manifest["target"] == "bedrock"
    assert imported["imported_model_arn"].startswith("arn:aws:bedrock:us-east-1:")
    assert imported["custom_model_units"] == 1
    assert imported["cost_per_active_hour_usd"] == round(0.057 * 60, 2)
    assert isinstance(imported["smoke_test"]["generation"], str)
    # The smoke test asks with the spec's decoding (the one the evaluator scored).
    smoke = {k: v for k, v in imported["smoke_test"].items() if k not in ("prompt", "generation")}
    assert smoke == {"max_gen_len": 8, "temperature": 0.0, "top_p": 1.0}
    # Every exported file is in the bucket, top level of the prefix, with its digest.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket, prefix = imported["s3_uri"][5:].split("/", 1)
    for name, sha in manifest["files"].items():
        head = s3.head_object(Bucket=bucket, Key=prefix + name)
        assert head["Metadata"]["sha256"] == sha
    assert {"config.json", "tokenizer.json", "README.md", "generation_config.json"} <= set(
        manifest["files"]
    )
    creates = standin.calls_to("CreateModelImportJob")
    assert len(creates) == 1
    assert creates[0]["clientRequestToken"] == imported["client_token"]
    assert creates[0]["modelDataSource"] == {"s3DataSource": {"s3Uri": imported["s3_uri"]}}
    assert ctx.jobs.model(f"terms-{cmd.job_id}")["bedrock"]["job_arn"] == imported["job_arn"]
    # A second delivery of the same command does nothing outside.
    handle(cmd, ctx)
    assert len(standin.calls_to("CreateModelImportJob")) == 1


def _dies_before_recording_the_import(monkeypatch, cmd, ctx):
    """A publish whose worker dies once CreateModelImportJob answered, before the ARN is
    stored."""
    real = ImportRecords.set_job_arn

    def crash(self, record, job_arn):
        monkeypatch.setattr(ImportRecords, "set_job_arn", real)
        raise RuntimeError("worker died before recording the import job")

    monkeypatch.setattr(ImportRecords, "set_job_arn", crash)
    with pytest.raises(RuntimeError, match="before recording"):
        handle(cmd, ctx)


def test_crash_between_import_call_and_record_starts_no_second_import(
    published, bedrock_env, standin, monkeypatch
):
    ctx, cmd = _bedrock_job(published, _job_id())
    _dies_before_recording_the_import(monkeypatch, cmd, ctx)
    handle(cmd, ctx)
    creates = standin.calls_to("CreateModelImportJob")
    assert len(creates) == 2
    assert creates[0]["clientRequestToken"] == creates[1]["clientRequestToken"]
    assert len(standin.jobs) == 1


def test_a_crash_after_the_import_call_then_another_export_adopts_the_started_import(
    published, bedrock_env, standin, monkeypatch
):
    """The next attempt's export differs (the card's merge-check figures, the merge device):
    it must not start a second, billed import of the same model beside the first."""
    ctx, cmd = _bedrock_job(published, _job_id())
    _dies_before_recording_the_import(monkeypatch, cmd, ctx)
    first = ImportRecords(ctx.store, f"{ctx.jobs.stage_prefix(cmd.job_id, 'publish')}/import.json")
    imported_digest = first.load().digest
    model_card = card.model_card
    monkeypatch.setattr(card, "model_card", lambda *a, **k: model_card(*a, **k) + "\nagain\n")
    handle(cmd, ctx)
    manifest = ctx.jobs.manifest(cmd.job_id, "publish")
    assert manifest["digest"] != imported_digest  # another export...
    assert len(standin.calls_to("CreateModelImportJob")) == 1  # ...and still one import
    assert len(standin.jobs) == 1
    assert manifest["bedrock"]["job_arn"] == next(iter(standin.jobs))
    assert manifest["bedrock"]["digest"] == imported_digest  # what Bedrock imported


def test_the_imported_models_quota_is_refused_at_once_naming_the_models(
    published, bedrock_env, standin
):
    """No import runs, so waiting frees nothing: the quota is the account's imported models."""
    standin.model_quota = 1
    handle(*reversed(_bedrock_job(published, _job_id())))  # the one model the account may hold
    held = next(iter(standin.models.values()))["modelName"]
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError, match=rf"imported models \(1: {held}\)"):
        handle(cmd, ctx)
    # the first job's, then ours twice (a wait apart, each refusal with no import running):
    # not a quota wait of 30 s
    assert len(standin.calls_to("CreateModelImportJob")) == 3
    looks = standin.calls_to("ListModelImportJobs")
    assert looks == [{"statusEquals": "InProgress", "maxResults": 1}] * 2


def test_two_jobs_publishing_one_name_at_once_import_it_once(published, bedrock_env, standin):
    """The name is held before the upload: the second job is refused before it imports, not
    after, when its import would be billed and recorded nowhere."""
    jobs = [_bedrock_job(published, _job_id(), model_name="shared-terms") for _ in range(2)]
    start, outcomes = threading.Barrier(2), {}

    def publish(ctx, cmd):
        start.wait()
        try:
            handle(cmd, ctx)
            outcomes[cmd.job_id] = "published"
        except BedrockError as exc:  # noqa: PERF203
            outcomes[cmd.job_id] = f"bedrock: {exc}"
        except Exception as exc:  # noqa: BLE001
            outcomes[cmd.job_id] = type(exc).__name__ + ": " + str(exc)

    threads = [threading.Thread(target=publish, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ctx = jobs[0][0]
    winner = ctx.jobs.model("shared-terms")["job_id"]
    loser = next(cmd.job_id for _, cmd in jobs if cmd.job_id != winner)
    assert outcomes[winner] == "published"
    assert outcomes[loser].startswith("SpecError: field 'publish.model_name': ")
    assert f"job {winner}" in outcomes[loser]  # (publishing it now, or has published it)
    assert len(standin.jobs) == 1 and len(standin.models) == 1


def test_a_failed_smoke_test_names_the_imported_model_it_leaves(published, bedrock_env, standin):
    standin.fail("InvokeModel", "ValidationException", "Malformed input request", times=100)
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError) as caught:
        handle(cmd, ctx)
    (arn,) = standin.models
    assert str(caught.value).startswith("smoke test: InvokeModel: ValidationException")
    assert f"the imported model {arn} stays in Bedrock" in str(caught.value)
    assert f"delete-imported-model --model-identifier {arn}" in str(caught.value)
    standin.faults.clear()
    handle(cmd, ctx)  # the retry smoke-tests the same import
    assert len(standin.calls_to("CreateModelImportJob")) == 1
    assert ctx.jobs.manifest(cmd.job_id, "publish")["bedrock"]["imported_model_arn"] == arn


def test_a_cancel_during_the_import_names_the_import_that_goes_on(published, bedrock_env, standin):
    """Through run_stage, as a worker runs it: the cancel is recorded, and the job's events
    say which import goes on; a retry adopts it."""
    ctx, cmd = _bedrock_job(published, _job_id())
    standin.import_seconds = 4.0

    def cancel_once_importing():
        while not standin.jobs:
            time.sleep(0.05)
        ctx.jobs.request_cancel(cmd.job_id)

    threading.Thread(target=cancel_once_importing, daemon=True).start()
    assert isinstance(run_stage(cmd, handle, ctx), JobCancelled)
    (job_arn,) = standin.jobs
    name = standin.jobs[job_arn].request["importedModelName"]
    said = [
        e.progress["detail"]
        for e in ctx.jobs.events(cmd.job_id)
        if isinstance(e, StageProgress) and "detail" in e.progress
    ]
    assert said and f"the Bedrock import job {job_arn} goes on" in said[-1]
    assert f"makes the model {name}: retry the job to use it" in said[-1]
    ctx.jobs.retry(cmd.job_id, retried=JobRetried(job_id=cmd.job_id, stage="publish"))
    handle(cmd, ctx)  # the retry adopts it
    assert len(standin.calls_to("CreateModelImportJob")) == 1
    assert ctx.jobs.manifest(cmd.job_id, "publish")["bedrock"]["job_arn"] == job_arn


def test_waits_out_the_one_import_quota(published, bedrock_env, standin):
    # Someone else's import is running: ours is refused, waits, and starts once it ends.
    standin.import_seconds = 600
    foreign = boto3.client("bedrock", endpoint_url=standin.url).create_model_import_job(
        jobName="someone-else",
        importedModelName="someone-else",
        roleArn=ROLE,
        modelDataSource={"s3DataSource": {"s3Uri": "s3://elsewhere/model/"}},
    )["jobArn"]
    standin.import_seconds = 0.2

    def end_foreign_import_after_a_refusal():
        while len(standin.calls_to("CreateModelImportJob")) < 3:
            time.sleep(0.05)
        standin.jobs[foreign].finishes = time.monotonic()

    threading.Thread(target=end_foreign_import_after_a_refusal, daemon=True).start()
    ctx, cmd = _bedrock_job(published, _job_id())
    handle(cmd, ctx)
    assert len(standin.calls_to("CreateModelImportJob")) >= 3  # refused at least once
    assert ctx.jobs.manifest(cmd.job_id, "publish")["bedrock"]["imported_model_arn"]


def test_retries_a_role_that_is_not_usable_yet(published, bedrock_env, standin):
    standin.fail(
        "CreateModelImportJob",
        "ValidationException",
        f"Could not assume the provided role {ROLE}; check its trust policy",
        times=2,
    )
    ctx, cmd = _bedrock_job(published, _job_id())
    handle(cmd, ctx)
    assert len(standin.calls_to("CreateModelImportJob")) == 3


def test_access_denied_names_the_missing_permission(published, bedrock_env, standin):
    standin.fail(
        "CreateModelImportJob",
        "AccessDeniedException",
        "User is not authorized to perform: bedrock:CreateModelImportJob",
    )
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError, match=r"needs bedrock:CreateModelImportJob and iam:PassRole"):
        handle(cmd, ctx)
    assert ctx.jobs.manifest(cmd.job_id, "publish") is None


def test_failed_import_reports_the_failure_message(published, bedrock_env, standin):
    standin.fail_imports_with = "The model architecture is not supported"
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError, match="failed: The model architecture is not supported"):
        handle(cmd, ctx)
    assert ctx.jobs.manifest(cmd.job_id, "publish") is None


def test_cold_model_is_retried_until_ready(published, bedrock_env, standin):
    standin.not_ready_invokes = 3
    ctx, cmd = _bedrock_job(published, _job_id())
    handle(cmd, ctx)
    assert len(standin.calls_to("InvokeModel")) == 4


def test_unsupported_region_is_refused_before_any_upload(
    published, bedrock_env, standin, monkeypatch, s3_endpoint, bucket
):
    monkeypatch.setenv("TERMTUNE_BEDROCK_REGION", "ap-south-1")
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError, match="not offered in 'ap-south-1'"):
        handle(cmd, ctx)
    assert standin.calls == [] and _objects(s3_endpoint, bucket) == []


def test_multipart_upload_is_checksummed_and_skipped_when_present(tmp_path, s3_endpoint, bucket):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(11 * 2**20))
    (tmp_path / "config.json").write_text("{}")
    files = upload.digests(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    seen = []
    first = upload.upload_folder(
        s3, tmp_path, bucket, "m/1", files=files, report=seen.append, part_mb=5
    )
    assert sorted(first["sent"]) == ["config.json", "model.safetensors"]
    head = s3.head_object(Bucket=bucket, Key="m/1/model.safetensors", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 1 MB
    assert head["Metadata"]["sha256"] == files["model.safetensors"]
    assert seen[-1]["bytes_done"] == seen[-1]["bytes_total"] == first["bytes"]
    again = upload.upload_folder(s3, tmp_path, bucket, "m/1", files=files, report=seen.append)
    assert again["sent"] == [] and sorted(again["skipped"]) == sorted(files)
    body = s3.get_object(Bucket=bucket, Key="m/1/model.safetensors")["Body"].read()
    assert body == (tmp_path / "model.safetensors").read_bytes()


def test_import_names_follow_the_api_patterns():
    settings = BedrockSettings(s3_uri="s3://bucket/models")
    record = plan_import("job-1", "medical-terms", "ab" * 32, settings)
    cmi.check_import(
        record.job_name,
        record.imported_model_name,
        record.client_token,
        record.s3_uri,
        ["config.json"],
    )
    with pytest.raises(PreflightError, match=r"import-names: importedModelName 'a\.b'"):
        cmi.check_import("job", "a.b", "t0ken", "s3://b/m/", [])
    with pytest.raises(PreflightError, match="s3-key-characters"):
        cmi.check_import("job", "model", "t0ken", "s3://b/my models/", [])


def test_failed_import_is_imported_again_under_new_names_on_the_next_publish(
    published, bedrock_env, standin
):
    """A user who fixed what made the import fail retries the job: its publish creates a new
    import job (new jobName and token, same model name) instead of failing on the old one."""
    standin.fail_imports_with = "Could not read the model files: access denied"
    ctx, cmd = _bedrock_job(published, _job_id())
    with pytest.raises(BedrockError, match="failed: Could not read the model files"):
        handle(cmd, ctx)
    # a record stored before records had an attempt reads as the first attempt
    key = f"{ctx.jobs.stage_prefix(cmd.job_id, 'publish')}/import.json"
    stored = ctx.store.get_json(key)
    ctx.store.put_json(key, {k: v for k, v in stored.items() if k != "attempt"})
    standin.fail_imports_with = None
    handle(cmd, ctx)
    first, second = standin.calls_to("CreateModelImportJob")
    assert second["jobName"] == f"{first['jobName']}-2"
    assert second["clientRequestToken"] != first["clientRequestToken"]
    assert second["importedModelName"] == first["importedModelName"]
    imported = ctx.jobs.manifest(cmd.job_id, "publish")["bedrock"]
    assert imported["job_arn"] != stored["job_arn"] and imported["imported_model_arn"]
    assert ImportRecords(ctx.store, key).load().attempt == 2
    handle(cmd, ctx)  # a completed second import is not imported a third time
    assert len(standin.calls_to("CreateModelImportJob")) == 2


def test_import_names_collapse_runs_of_dashes_the_api_refuses():
    settings = BedrockSettings(s3_uri="s3://bucket/models")
    digest = "ab" * 32
    record = plan_import("job-1", "term--glossary", digest, settings)
    assert record.imported_model_name == f"term-glossary-{digest[:10]}"
    assert record.job_name == f"term-glossary-{digest[:10]}-import"
    assert record.client_token == hashlib.sha256(f"job-1:{digest}".encode()).hexdigest()
    assert record.s3_uri == f"s3://bucket/models/term--glossary/{digest[:10]}/"
    cmi.check_import(
        record.job_name, record.imported_model_name, record.client_token, record.s3_uri, []
    )


@pytest.mark.parametrize("attempt", [1, 2, 12])
def test_import_names_of_every_attempt_fit_the_api(attempt):
    settings = BedrockSettings(s3_uri="s3://bucket/models")
    longest = "a" * 46 + "-b"  # the longest model name a job spec allows (48)
    record = plan_import("job-1", longest, "cd" * 32, settings, attempt=attempt)
    first = plan_import("job-1", longest, "cd" * 32, settings)
    assert record.attempt == attempt and record.imported_model_name == first.imported_model_name
    assert record.job_name.endswith("-import" + (f"-{attempt}" if attempt > 1 else ""))
    assert (record.client_token == first.client_token) == (attempt == 1)
    cmi.check_import(
        record.job_name, record.imported_model_name, record.client_token, record.s3_uri, []
    )


@pytest.mark.parametrize(
    "s3_uri",
    [
        "s3://My-Bucket/models/m/",  # bucket names are lowercase
        "s3://b/models/m/",  # a bucket name has 3 to 63 characters
        "s3://bucket//m/",  # an empty path segment
        "s3://bucket/models/m~1/",  # a character outside the pattern
    ],
)
def test_an_s3_uri_outside_the_api_pattern_is_refused_before_upload(s3_uri):
    pattern = re.escape("s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+")
    with pytest.raises(
        PreflightError, match=rf"s3-key-characters: S3 URI '{re.escape(s3_uri)}' .*{pattern}"
    ):
        cmi.check_import("job", "model", "t0ken", s3_uri, ["config.json"])


def test_an_s3_uri_over_the_api_length_is_refused():
    s3_uri = "s3://bucket/" + "/".join(["a" * 99] * 11) + "/"
    with pytest.raises(PreflightError, match=r"s3-key-characters: S3 URI 's3://.*1-1024 char"):
        cmi.check_import("job", "model", "t0ken", s3_uri, [])


def test_a_failed_upload_names_the_file_and_key(tmp_path, s3_endpoint):
    (tmp_path / "config.json").write_text("{}")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    missing = f"missing-{uuid.uuid4().hex[:8]}"  # upload_file raises S3UploadFailedError
    with pytest.raises(
        StoreUnavailable, match=rf"uploading config.json to s3://{missing}/m/1/config.json: "
    ):
        upload.upload_folder(
            s3, tmp_path, missing, "m/1", files=upload.digests(tmp_path), report=lambda p: None
        )


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (EndpointConnectionError(endpoint_url="https://x"), "cannot reach Bedrock"),
        (ConnectTimeoutError(endpoint_url="https://x"), "the connection to Bedrock failed"),
        (ReadTimeoutError(endpoint_url="https://x"), "the connection to Bedrock failed"),
        (ConnectionClosedError(endpoint_url="https://x"), "the connection to Bedrock failed"),
    ],
)
def test_a_network_failure_is_retryable_and_says_what_to_check(error, says):
    """Through a real boto3 client: the request fails on the wire (a before-send hook)."""
    from botocore.config import Config

    client = boto3.client(
        "bedrock-runtime", region_name="us-east-1", config=Config(retries={"max_attempts": 1})
    )

    def fail(**kwargs):
        raise error

    client.meta.events.register("before-send.bedrock-runtime.InvokeModel", fail)
    with pytest.raises(
        RetryableError, match=rf"InvokeModel: {says} .*check TERMTUNE_BEDROCK_REGION.*network"
    ):
        bedrock.invoke(client, "arn:x", {"prompt": "p"}, retries=0, wait_seconds=0)


def test_missing_credentials_stay_permanent():
    explained = bedrock.explain(NoCredentialsError(), "GetModelImportJob")
    assert isinstance(explained, BedrockError)
    assert "no AWS credentials" in str(explained)


def test_create_request_matches_botocore_service_model():
    from botocore.stub import Stubber

    client = boto3.client("bedrock", region_name="us-east-1")
    settings = BedrockSettings(role_arn=ROLE, s3_uri="s3://b/models")
    record = plan_import("job-1", "medical-terms", "cd" * 32, settings)
    with Stubber(client) as stub:
        stub.add_response(
            "create_model_import_job",
            {"jobArn": "arn:aws:bedrock:us-east-1:123456789012:model-import-job/x1"},
            {
                "jobName": record.job_name,
                "importedModelName": record.imported_model_name,
                "roleArn": ROLE,
                "modelDataSource": {"s3DataSource": {"s3Uri": record.s3_uri}},
                "clientRequestToken": record.client_token,
                "jobTags": [{"key": "termtune:digest", "value": record.digest}],
            },
        )
        arn = Importer(client, settings, report=lambda *a, **k: None).create(record)
    assert arn.endswith("model-import-job/x1")


@pytest.mark.parametrize(
    "body",
    [
        {"generation": "a drug", "stop_reason": "stop"},
        {"choices": [{"text": "a drug"}]},
        {"outputs": [{"text": "a drug"}]},
    ],
)
def test_every_invoke_response_shape_is_understood(body):
    assert bedrock.generation_of(body) == "a drug"


def test_an_unknown_invoke_response_shape_is_an_error():
    with pytest.raises(BedrockError, match=r"unrecognised invoke response shape \(keys \['x'\]\)"):
        bedrock.generation_of({"x": 1})


def test_invoke_gives_up_after_the_configured_tries():
    from botocore.stub import Stubber

    client = boto3.client("bedrock-runtime", region_name="us-east-1")
    slept = []
    with Stubber(client) as stub:
        for _ in range(3):
            stub.add_client_error("invoke_model", "ModelNotReadyException", http_status_code=429)
        with pytest.raises(BedrockError, match="ModelNotReadyException"):
            bedrock.invoke(
                client, "arn:x", {"prompt": "p"}, retries=2, wait_seconds=7, sleep=slept.append
            )
    assert slept == [7, 7]


def test_control_plane_lists_invokes_and_deletes_an_imported_model(published, bedrock_env, standin):
    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from shared.bus import Bus
    from shared.settings import ApiSettings

    ctx, cmd = _bedrock_job(published, _job_id())
    handle(cmd, ctx)
    name = f"terms-{cmd.job_id}"
    arn = ctx.jobs.model(name)["bedrock"]["imported_model_arn"]
    settings = ApiSettings(
        var_dir=ctx.settings.var_dir,
        database_url=ctx.settings.database_url,
        broker_url="memory://",
        api_key="k",
        exchange="tb",
    )
    with TestClient(create_app(settings, bus=Bus(settings))) as client:
        client.headers["Authorization"] = "Bearer k"
        listed = client.get("/v1/imported-models").json()["data"]
        assert {"modelArn": arn, "termtune_model": name}.items() <= next(
            m for m in listed if m["modelArn"] == arn
        ).items()
        standin.not_ready_invokes = 2
        answer = client.post(f"/v1/models/{name}/invoke", json={"prompt": "What is Asthma?"})
        assert answer.status_code == 200 and isinstance(answer.json()["generation"], str)
        assert standin.calls_to("InvokeModel")[-1] == {"modelId": arn}
        standin.fail("InvokeModel", "AccessDeniedException", "not authorized")
        denied = client.post(f"/v1/models/{name}/invoke", json={"prompt": "What is Asthma?"})
        assert denied.status_code == 502 and "bedrock:InvokeModel" in denied.json()["detail"]
        deleted = client.delete(f"/v1/models/{name}")
        assert deleted.json() == {"deleted": name, "imported_model_arn": arn}
        assert arn not in standin.models
        assert client.get(f"/v1/models/{name}").status_code == 404


def test_a_chat_tuned_model_is_smoke_tested_with_a_chat_message(
    published_qwen, trained_qwen, bedrock_env, standin
):
    """A decoder-only model trained in its chat template goes to Bedrock with the template,
    and the smoke test asks it as it was evaluated: through chat completions."""
    ctx, evaluated, _ = published_qwen
    evaluate = trained_qwen["evaluate"]
    job_id = _job_id()
    data = ctx.spec(evaluate).model_dump(mode="json")
    data["publish"] = {"target": "bedrock", "model_name": f"qwen-{job_id}"}
    cmd = PublishModel(
        job_id=job_id,
        spec_uri=ctx.jobs.create(job_id, parse_spec(data)),
        dataset_manifest=evaluate.dataset_manifest,
        training_manifest=evaluate.training_manifest,
        evaluation_manifest=evaluated.manifest,
    )
    handle(cmd, ctx)
    manifest = ctx.jobs.manifest(job_id, "publish")
    smoke = manifest["bedrock"]["smoke_test"]
    sample = ctx.jobs.manifest("qwen-job", "evaluate")["samples"]
    prompt = smoke["messages"][0]["content"]
    assert smoke["messages"] == [{"role": "user", "content": prompt}] and "prompt" not in smoke
    assert {k: smoke[k] for k in ("max_tokens", "temperature", "top_p")} == {
        "max_tokens": 8, "temperature": 0.0, "top_p": 1.0,
    }  # fmt: skip
    # the first test row, among the report's samples: Bedrock (the stand-in) answers it as
    # the evaluator scored it
    assert smoke["generation"] == next(s["tuned"] for s in sample if s["prompt"] == prompt)
    assert manifest["preflight"]["chat_template"] is True
    assert ctx.jobs.model(f"qwen-{job_id}")["chat"] is True
    (invoke,) = standin.calls_to("InvokeModel")
    assert invoke["modelId"] == manifest["bedrock"]["imported_model_arn"]


def test_gpt_oss_goes_to_bedrock_in_us_east_1_and_is_asked_in_openai_shapes(
    published_gpt_oss, bedrock_env, standin
):
    """GPT-OSS's export imports (us-east-1), its smoke test is a chat message answered with
    the final channel as the evaluator scored it, and the control plane asks Bedrock in
    OpenAI's shapes only: a Bedrock completion request is refused before any call."""
    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from shared.bus import Bus
    from tests.factories import api_settings

    ctx, evaluate, evaluated = published_gpt_oss
    job_id = _job_id()
    data = ctx.spec(evaluate).model_dump(mode="json")
    data["publish"] = {"target": "bedrock", "model_name": f"oss-{job_id}"}
    handle(
        PublishModel(
            job_id=job_id,
            spec_uri=ctx.jobs.create(job_id, parse_spec(data)),
            dataset_manifest=evaluate.dataset_manifest,
            training_manifest=evaluate.training_manifest,
            evaluation_manifest=evaluated.manifest,
        ),
        ctx,
    )
    manifest = ctx.jobs.manifest(job_id, "publish")
    assert manifest["preflight"]["model_type"] == "gpt_oss"
    smoke = manifest["bedrock"]["smoke_test"]
    prompt = smoke["messages"][0]["content"]
    samples = ctx.jobs.manifest("oss-job", "evaluate")["samples"]
    assert smoke["generation"] == next(s["tuned"] for s in samples if s["prompt"] == prompt)
    assert smoke["generation"] and "<|" not in smoke["generation"]
    name = f"oss-{job_id}"
    settings = api_settings(ctx, "k")
    with TestClient(create_app(settings, bus=Bus(settings))) as client:
        client.headers["Authorization"] = "Bearer k"
        asked = client.post(f"/v1/models/{name}/invoke", json={"prompt": prompt, "max_tokens": 8})
        assert asked.status_code == 200, asked.text
        assert asked.json()["object"] == "text_completion"
        calls = len(standin.calls_to("InvokeModel"))
        refused = client.post(
            f"/v1/models/{name}/invoke", json={"prompt": prompt, "max_gen_len": 8}
        )
        assert refused.status_code == 422 and "only in OpenAI's" in refused.json()["detail"]
        assert len(standin.calls_to("InvokeModel")) == calls  # refused here, not by Bedrock
