"""base_model as a local folder: an uploaded model is checked, downloaded once, cached."""

from __future__ import annotations

import uuid

import pytest

from shared.basemodel import base_model_config, check_uploaded, resolve_base_model
from shared.errors import Conflict, ModelError, SpecError
from shared.store import LocalStore, S3Store
from tests.unit.shared.test_uploads import put_model, small_model


@pytest.fixture
def s3(s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return S3Store(bucket, "termtune", client=client)


class _Counted:
    """Counts a store's downloads."""

    def __init__(self, store, monkeypatch):
        self.keys: list[str] = []
        real = store.download_file

        def download_file(key, path):
            self.keys.append(key)
            real(key, path)

        monkeypatch.setattr(store, "download_file", download_file)


def test_an_uploaded_model_is_downloaded_once_then_read_from_the_cache(s3, tmp_path, monkeypatch):
    folder = small_model(tmp_path / "m")
    location = put_model(s3, folder)
    digest = location.rsplit("/", 1)[1]
    counted = _Counted(s3, monkeypatch)
    local = resolve_base_model(location, store=s3, cache_dir=tmp_path / "cache")
    assert local == str(tmp_path / "cache" / "base-models" / digest)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "cache" / "base-models" / digest / name).read_bytes() == (
            folder / name
        ).read_bytes()
    assert len(counted.keys) == 3
    again = resolve_base_model(location, store=s3, cache_dir=tmp_path / "cache")
    assert again == local and len(counted.keys) == 3  # the cache, no download
    cached = [p.name for p in (tmp_path / "cache" / "base-models").iterdir()]
    assert cached == [digest]  # no staging folder left


def test_a_file_changed_in_the_store_is_refused_and_nothing_is_cached(s3, tmp_path):
    location = put_model(s3, small_model(tmp_path / "m"))
    key = f"{s3.key_of(location)}/tokenizer.json"
    s3.put_bytes(key, b'{"changed": true}')
    with pytest.raises(ModelError, match="tokenizer.json differs from what was uploaded"):
        resolve_base_model(location, store=s3, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "base-models").iterdir()) == []


def test_an_estimate_fetches_only_the_config(s3, tmp_path, monkeypatch):
    location = put_model(s3, small_model(tmp_path / "m"))
    counted = _Counted(s3, monkeypatch)
    folder = base_model_config(location, store=s3, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "base-models").glob("*/*")) == [
        "config.json"
    ]
    assert counted.keys == [f"{s3.key_of(location)}/config.json"]
    assert folder.endswith(".config")


def test_a_store_location_without_the_marker_is_refused(s3, tmp_path):
    folder = small_model(tmp_path / "m")
    with pytest.raises(Conflict, match="not complete"):
        put_model(s3, folder, leave_out="tokenizer.json")
    digest_location = s3.uri(
        next(k for k in s3.list("uploads/models") if k.endswith("config.json")).rsplit("/", 1)[0]
    )
    with pytest.raises(SpecError, match=r"not a finished upload \(no _complete.json\)"):
        resolve_base_model(digest_location, store=s3, cache_dir=tmp_path / "cache")
    with pytest.raises(SpecError, match="not a finished upload"):
        check_uploaded(digest_location, store=s3)


@pytest.mark.parametrize(
    "where,message",
    [
        ("{root}/jobs/j-1/train/adapter", "is not an uploaded model folder"),
        ("{root}/uploads/models/abc", "is not an uploaded model folder"),
        ("{root}/uploads/datasets/" + "0" * 64, "is not an uploaded model folder"),
        ("s3://elsewhere/models/flan", "is outside this deployment's object store"),
        ("file:///models/flan", "is outside this deployment's object store"),
    ],
)
def test_other_locations_are_refused_naming_the_field(tmp_path, where, message):
    store = LocalStore(tmp_path / "store")
    base_model = where.format(root=store.root_uri)
    with pytest.raises(SpecError, match=f"base_model: .*{message}"):
        check_uploaded(base_model, store=store)


def test_a_hub_id_or_a_local_folder_is_given_as_it_is(tmp_path):
    store = LocalStore(tmp_path / "store")
    for base_model in ("google/flan-t5-large", "var/models/tiny-flan-t5"):
        assert check_uploaded(base_model, store=store) is None
        assert resolve_base_model(base_model, store=store, cache_dir=tmp_path) == base_model


def test_a_local_store_is_read_in_place(tmp_path):
    store = LocalStore(tmp_path / "store")
    location = put_model(store, small_model(tmp_path / "m"))
    local = resolve_base_model(location, store=store, cache_dir=tmp_path / "cache")
    assert local == str(store.path(store.key_of(location)))
    assert not (tmp_path / "cache").exists()
