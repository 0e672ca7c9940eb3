import pytest

from shared.errors import NotFound, StoreLocationError, StoreUnavailable
from shared.settings import Settings
from shared.store import LocalStore, S3Store, open_store, s3_client


@pytest.fixture
def local(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="termtune-test")
    return S3Store("termtune-test", "prefix", client=client)


@pytest.fixture(params=["local", "s3"])
def store(request, local, s3):
    return local if request.param == "local" else s3


def test_put_get_list(store):
    store.put_json("jobs/a/spec.json", {"x": 1})
    store.put_bytes("jobs/a/events/2.json", b"{}")
    store.put_bytes("jobs/b/spec.json", b"{}")
    assert store.get_json("jobs/a/spec.json") == {"x": 1}
    assert store.list("jobs/a") == ["jobs/a/events/2.json", "jobs/a/spec.json"]
    assert store.exists("jobs/b/spec.json") and not store.exists("jobs/c/spec.json")


def test_missing_object_is_not_found(store, tmp_path):
    with pytest.raises(NotFound, match="no object at"):
        store.get_bytes("jobs/none/spec.json")
    with pytest.raises(NotFound, match="no object at"):  # a FileNotFoundError, a 404 before
        store.download_file("jobs/none/train-00000.parquet", tmp_path / "shard")


def test_first_writer_wins(store):
    assert store.put_bytes_if_absent("jobs/a/lock", b"first") is True
    assert store.put_bytes_if_absent("jobs/a/lock", b"second") is False
    assert store.get_bytes("jobs/a/lock") == b"first"


def test_uri_round_trip(store):
    uri = store.uri("jobs/a/spec.json")
    assert store.key_of(uri) == "jobs/a/spec.json"


@pytest.mark.parametrize("uri", ["s3://other-bucket/jobs/a", "file:///etc/passwd"])
def test_uri_outside_the_store_is_refused(store, uri):
    with pytest.raises(StoreLocationError, match="outside the object store"):
        store.key_of(uri)


@pytest.mark.parametrize("key", ["../escape", "jobs/../../x", "/abs", "jobs//x", ""])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(StoreLocationError, match="invalid store key"):
        store.put_bytes(key, b"x")


def test_upload_and_local_dir(store, tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a")
    (folder / "sub" / "b.txt").write_text("b")
    keys = store.upload_dir(folder, "jobs/x/model")
    assert keys == ["jobs/x/model/a.bin", "jobs/x/model/sub/b.txt"]
    local = store.local_dir("jobs/x/model", tmp_path / "cache")
    assert (local / "sub" / "b.txt").read_text() == "b"


def test_local_write_is_atomic_and_leaves_no_temp(local):
    local.put_bytes("k/v", b"1")
    local.put_bytes("k/v", b"2")
    assert local.get_bytes("k/v") == b"2"
    assert [p.name for p in (local.root / "k").iterdir()] == ["v"]


def test_open_store_defaults_to_var(tmp_path):
    store = open_store(Settings(var_dir=tmp_path))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "store").resolve()


def test_open_store_rejects_unknown_scheme(tmp_path):
    with pytest.raises(StoreLocationError, match="TERMTUNE_STORE_URL"):
        open_store(Settings(var_dir=tmp_path, store_url="ftp://x"))


def test_compare_and_swap(store):
    store.put_bytes("jobs/a/lease.json", b"one")
    data, version = store.get_versioned("jobs/a/lease.json")
    assert data == b"one"
    assert store.put_if_version("jobs/a/lease.json", b"two", version) is True
    assert store.put_if_version("jobs/a/lease.json", b"three", version) is False  # stale
    assert store.get_bytes("jobs/a/lease.json") == b"two"
    assert store.put_if_version("jobs/a/none.json", b"x", version) is False
    store.delete("jobs/a/lease.json")
    store.delete("jobs/a/lease.json")  # missing is fine
    assert not store.exists("jobs/a/lease.json")


def test_a_full_disk_leaves_no_temporary_file_and_says_so(tmp_path, monkeypatch):
    """Issue 19: a publisher on a full disk left a 1.1 MB temporary file in the store."""
    import errno
    import shutil

    from shared.errors import StoreUnavailable
    from shared.store import LocalStore

    store = LocalStore(tmp_path / "store")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 1_100_000)

    def full(src, dst):
        with open(dst, "wb") as out:
            out.write(b"x" * 500_000)  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(StoreUnavailable, match=r"no space left to write .*/models"):
        store.upload_file(source, "jobs/a/publish/models/weights.bin")
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(
        "pathlib.Path.write_bytes",
        lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")),
    )
    with pytest.raises(StoreUnavailable):
        store.put_bytes("jobs/a/spec.json", b"{}")
    with pytest.raises(StoreUnavailable):
        store.put_bytes_if_absent("jobs/a/spec.json", b"{}")
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def _signer(client) -> list[str]:
    """The key ids the client's requests are signed with (from their Authorization header)."""
    seen: list[str] = []

    def record(request, **_):
        seen.append(request.headers["Authorization"].decode().split("Credential=")[1][:8])

    client.meta.events.register("before-send.s3", record)
    return seen


def test_the_store_signs_with_the_key_in_its_credentials_file(s3, s3_endpoint, tmp_path):
    key = tmp_path / "credentials"
    key.write_text("[default]\naws_access_key_id = AKIAAPP1\naws_secret_access_key = s\n")
    settings = Settings(
        var_dir=tmp_path,
        store_url="s3://termtune-test/prefix",
        s3_endpoint_url=s3_endpoint,
        s3_credentials_file=key,
    )
    store = open_store(settings)
    seen = _signer(store.client)
    assert store.list("anything") == []
    assert seen == ["AKIAAPP1"]
    # A key s3-init replaced is taken up by the next client.
    key.write_text("[default]\naws_access_key_id = AKIAAPP2\naws_secret_access_key = s\n")
    client = s3_client(settings)
    seen = _signer(client)
    client.list_objects_v2(Bucket="termtune-test")
    assert seen == ["AKIAAPP2"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "no such file"),
        ("[default]\naws_access_key_id = AKIAAPP1\n", "has no aws_secret_access_key"),
        ("[other]\naws_access_key_id = a\naws_secret_access_key = b\n", "has no aws_access_key"),
        ("not an ini file\n", "Unable to parse"),
    ],
)
def test_a_missing_or_incomplete_credentials_file_is_named(tmp_path, text, says):
    key = tmp_path / "credentials"
    if text is not None:
        key.write_text(text)
    settings = Settings(var_dir=tmp_path, store_url="s3://b/p", s3_credentials_file=key)
    with pytest.raises(StoreUnavailable) as caught:
        open_store(settings)
    assert f"TERMTUNE_S3_CREDENTIALS_FILE: {key}" in str(caught.value)
    assert says in str(caught.value)
