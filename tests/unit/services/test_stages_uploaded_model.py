"""Every stage loads a base model uploaded into an S3 store (downloaded once per machine)
and reads a dataset uploaded there: the job runs end to end on store locations alone."""

from __future__ import annotations

import importlib
import uuid

from shared.messages import PrepareDataset
from shared.pipeline import next_command
from shared.settings import Settings
from shared.store import S3Store
from shared.uploads import file_sha256, store_dataset
from shared.worker import StageContext, run_stage
from tests.factories import SAMPLE_DATA, make_jobs, make_spec
from tests.unit.shared.test_uploads import put_model


def _handle(service: str):  # noqa: ANN202
    return importlib.import_module(f"services.{service}.handler").handle


def test_a_job_on_an_uploaded_model_and_dataset_runs_every_stage(tmp_path, tiny_model, s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"stages-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "termtune", client=client)
    settings = Settings(var_dir=tmp_path / "var", environment="production")
    ctx = StageContext(store=store, jobs=make_jobs(settings, store), settings=settings)
    base_model = put_model(store, tiny_model)
    key = store_dataset(
        store, SAMPLE_DATA, sha256=file_sha256(SAMPLE_DATA), filename="medical_terms.jsonl"
    )
    spec = make_spec(
        tiny_model,
        base_model=base_model,
        dataset={"source": store.uri(key)},
        training={"max_steps": 2},
        evaluation={"max_rows": 4},
    )
    command = PrepareDataset(job_id="uploaded", spec_uri=ctx.jobs.create("uploaded", spec))
    for service in ("dataprep", "trainer", "evaluator", "publisher"):
        event = run_stage(command, _handle(service), ctx)
        assert event.type != "StageFailed", event
        command = next_command(command, event)
    assert event.type == "ModelPublished"
    entry = ctx.jobs.model(spec.model_name)
    assert entry["base_model"] == base_model
    prepared = ctx.jobs.manifest("uploaded", "prepare")
    assert prepared["tokenizer"]["name"] == base_model
    cached = list((settings.cache_dir / "base-models").iterdir())
    assert [p.name for p in cached] == [base_model.rsplit("/", 1)[1]]  # one download
