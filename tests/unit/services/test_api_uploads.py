"""/v1/uploads: a dataset file and a base model folder put into the store, then submitted
to a production control plane (which refuses local paths)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from shared.bus import Bus
from shared.settings import ApiSettings
from shared.uploads import file_sha256, folder_digest, model_files
from tests.factories import SAMPLE_DATA, spec_dict
from tests.unit.shared.test_uploads import small_model

KEY = "test-key-123"


def _production(tmp_path, **extra) -> ApiSettings:
    return ApiSettings(
        var_dir=tmp_path / "var",
        broker_url="memory://",
        api_key=KEY,
        exchange=f"t{uuid.uuid4().hex[:8]}",
        environment="production",
        **extra,
    )


def _client(settings: ApiSettings):
    app = create_app(settings, bus=Bus(settings))
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client, app


@pytest.fixture(params=["local", "s3"])
def api(request, tmp_path):
    """A production control plane on a local folder store or on S3 (moto)."""
    extra = {}
    if request.param == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"up-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        extra = {"store_url": f"s3://{bucket}/termtune", "s3_endpoint_url": endpoint}
    client, app = _client(_production(tmp_path, **extra))
    with client:
        yield client, app


@pytest.fixture
def small_limit(tmp_path):
    client, app = _client(_production(tmp_path, max_upload_bytes=1000))
    with client:
        yield client, app


def _put_model(client, folder, *, leave_out=None):
    """Every file of a model folder by PUT (but ``leave_out``), then the finishing POST."""
    files = model_files(folder)
    shas = {name: file_sha256(path) for name, path in files.items()}
    prefix = f"/v1/uploads/models/{folder_digest(shas)}"
    for name, path in files.items():
        if name != leave_out:
            put = client.put(f"{prefix}/{name}", content=path.read_bytes())
            assert put.status_code == 200, put.text
            assert put.json()["sha256"] == shas[name]
    manifest = {"files": [{"path": n, "sha256": s} for n, s in shas.items()]}
    return client.post(prefix, json=manifest), prefix


def test_uploaded_dataset_and_model_are_submitted_in_production(api, tmp_path):
    client, app = api
    store = app.state.jobs.store
    folder = small_model(tmp_path / "model")
    local = spec_dict(folder, name="terms")
    refused = client.post("/v1/jobs", json=local)
    assert refused.status_code == 422 and "TERMTUNE_ALLOWED_PATHS" in refused.json()["detail"]

    put = client.put("/v1/uploads/datasets/medical_terms.jsonl", content=SAMPLE_DATA.read_bytes())
    assert put.status_code == 200, put.text
    dataset = put.json()
    sha = file_sha256(SAMPLE_DATA)
    assert dataset == {
        "location": store.uri(f"uploads/datasets/{sha}/medical_terms.jsonl"),
        "sha256": sha,
        "bytes": SAMPLE_DATA.stat().st_size,
    }
    finished, prefix = _put_model(client, folder)
    assert finished.status_code == 200, finished.text
    model = finished.json()
    assert model["location"] == store.uri(f"uploads/models/{prefix.rsplit('/', 1)[1]}")
    assert sorted(model["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert client.get(prefix).json() == model

    uploaded = spec_dict(
        folder, name="terms", base_model=model["location"], dataset={"source": dataset["location"]}
    )
    response = client.post("/v1/jobs", json=uploaded)
    assert response.status_code == 201, response.text
    spec = app.state.jobs.spec(response.json()["id"])
    assert spec.dataset.source == dataset["location"] and spec.base_model == model["location"]
    assert spec.dataset.source.startswith(store.root_uri + "/uploads/datasets/")
    assert spec.base_model.startswith(store.root_uri + "/uploads/models/")
    assert store.get_bytes(store.key_of(dataset["location"])) == SAMPLE_DATA.read_bytes()


def test_the_same_content_again_answers_the_same_location(api):
    client, app = api
    first = client.put("/v1/uploads/datasets/terms.csv", content=b"page_title,page_text\na,b\n")
    again = client.put("/v1/uploads/datasets/terms.csv", content=b"page_title,page_text\na,b\n")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(app.state.jobs.store.list("uploads/datasets")) == 1


@pytest.mark.parametrize(
    "name", [".hidden.jsonl", "terms.txt", "a b.jsonl", "x" * 130 + ".jsonl", "t\u00e9rms.csv"]
)
def test_a_bad_filename_is_refused_naming_the_field_and_stores_nothing(small_limit, name):
    client, app = small_limit
    response = client.put(f"/v1/uploads/datasets/{name}", content=b'{"a": 1}\n')
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "filename"]
    assert app.state.jobs.store.list("uploads") == []


def test_an_empty_file_is_refused(small_limit):
    client, _ = small_limit
    response = client.put("/v1/uploads/datasets/terms.jsonl", content=b"")
    assert response.status_code == 422 and response.json()["detail"] == "the file is empty"


def test_over_the_limit_is_413_and_leaves_nothing(small_limit, tmp_path):
    client, app = small_limit
    declared = client.put("/v1/uploads/datasets/big.jsonl", content=b"x" * 1001)
    assert declared.status_code == 413
    assert "over 1000 bytes (TERMTUNE_MAX_UPLOAD_BYTES)" in declared.json()["detail"]
    streamed = client.put(  # no length up front: refused while it streams
        "/v1/uploads/datasets/big.jsonl", content=(b"x" * 400 for _ in range(3))
    )
    assert streamed.status_code == 413
    model_file = client.put(f"/v1/uploads/models/{'a' * 64}/model.safetensors", content=b"x" * 1001)
    assert model_file.status_code == 413
    assert app.state.jobs.store.list("uploads") == []
    assert list((tmp_path / "var" / "cache" / "uploads").iterdir()) == []  # no temporary file
    fits = client.put("/v1/uploads/datasets/small.jsonl", content=b"x" * 1000)
    assert fits.status_code == 200  # the limit is the upload's, not the 1 MiB request limit


def test_a_model_missing_a_file_is_refused_when_finished_and_cannot_be_submitted(
    small_limit, tmp_path
):
    client, app = small_limit
    folder = small_model(tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"w" * 900)
    finished, prefix = _put_model(client, folder, leave_out="tokenizer.json")
    assert finished.status_code == 409
    assert "not complete: tokenizer.json (not uploaded)" in finished.json()["detail"]
    assert client.get(prefix).status_code == 404
    location = app.state.jobs.store.uri(prefix.removeprefix("/v1/"))
    spec = {"name": "terms", "base_model": location, "dataset": {"source": "a/b"}}
    refused = client.post("/v1/jobs", json=spec)
    assert refused.status_code == 422
    assert "not a finished upload (no _complete.json)" in refused.json()["detail"]

    put = client.put(f"{prefix}/tokenizer.json", content=(folder / "tokenizer.json").read_bytes())
    assert put.status_code == 200
    files = {
        "files": [{"path": n, "sha256": file_sha256(p)} for n, p in model_files(folder).items()]
    }
    assert client.post(prefix, json=files).status_code == 200
    assert client.post("/v1/jobs", json=spec).status_code == 201


def test_a_manifest_of_another_folder_is_refused(small_limit):
    client, _ = small_limit
    manifest = {"files": [{"path": "config.json", "sha256": "1" * 64}]}
    response = client.post(f"/v1/uploads/models/{'0' * 64}", json=manifest)
    assert response.status_code == 422
    assert "the manifest's digest is" in response.json()["detail"]
    twice = {"files": manifest["files"] * 2}
    assert client.post(f"/v1/uploads/models/{'0' * 64}", json=twice).status_code == 422


@pytest.mark.parametrize(
    "path",
    [".hidden", "a/%2E%2E/b", "a/%2e%2e", "_complete.json", "a/b/c/d/e/f.json", "sp ace.json"],
)
def test_a_bad_model_file_path_is_refused(small_limit, path):
    client, app = small_limit
    response = client.put(f"/v1/uploads/models/{'0' * 64}/{path}", content=b"{}")
    assert response.status_code == 422, response.text
    assert app.state.jobs.store.list("uploads") == []


@pytest.mark.parametrize(
    "base_model,message",
    [
        ("{root}/jobs/j-1/train/adapter", "is not an uploaded model folder"),
        ("s3://elsewhere/models/flan", "is outside this deployment's object store"),
    ],
)
def test_a_base_model_location_elsewhere_is_refused(small_limit, base_model, message):
    client, app = small_limit
    spec = {"name": "terms", "base_model": base_model.format(root=app.state.jobs.store.root_uri)}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422 and message in response.json()["detail"]


def test_upload_routes_need_the_key(small_limit):
    client, _ = small_limit
    client.headers.pop("Authorization")
    for method, path in [
        ("put", "/v1/uploads/datasets/terms.jsonl"),
        ("put", f"/v1/uploads/models/{'0' * 64}/config.json"),
        ("post", f"/v1/uploads/models/{'0' * 64}"),
        ("get", f"/v1/uploads/models/{'0' * 64}"),
    ]:
        assert client.request(method, path, content=b"{}").status_code == 401, path
