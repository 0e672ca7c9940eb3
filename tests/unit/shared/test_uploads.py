"""Uploaded files' layout and rules: names, digests, a model folder's files, finishing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import Conflict, UploadError
from shared.store import LocalStore, Store
from shared.uploads import (
    DATASET_SUFFIXES,
    MARKER,
    check_dataset_name,
    file_sha256,
    finish_model,
    folder_digest,
    model_files,
    model_prefix,
    read_marker,
    store_model_file,
    upload_name,
)


def put_model(store: Store, folder: Path, *, leave_out: str | None = None) -> str:
    """Put a model folder into a store as the upload routes do (file by file, then the
    marker); its location. ``leave_out``: a file not put, so the finish is refused."""
    files = model_files(folder)
    shas = {name: file_sha256(path) for name, path in files.items()}
    digest = folder_digest(shas)
    for name, path in files.items():
        if name != leave_out:
            size = path.stat().st_size
            store_model_file(store, path, digest=digest, path=name, sha256=shas[name], size=size)
    finish_model(store, digest, shas)
    return store.uri(model_prefix(digest))


def small_model(folder: Path) -> Path:
    """A folder shaped like one `save_pretrained` wrote (tiny made-up files)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "t5"}')
    (folder / "model.safetensors").write_bytes(os.urandom(2048))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_the_dataset_suffixes_are_the_ones_data_prep_reads():
    from services.dataprep.sources import FILE_SUFFIXES

    assert DATASET_SUFFIXES == FILE_SUFFIXES


@pytest.mark.parametrize(
    "name", [".hidden.jsonl", "a b.jsonl", "a.txt", "x" * 126 + ".jsonl", ".jsonl", "é.csv", ""]
)
def test_a_dataset_name_off_the_rules_is_refused(name):
    with pytest.raises(UploadError, match="letters, digits|must end in one of"):
        check_dataset_name(name)


def test_a_local_file_name_is_made_uploadable():
    assert upload_name("medical terms (v2).JSONL") == "medical_terms__v2_.jsonl"
    assert upload_name(".hidden.csv") == "hidden.csv"
    assert len(upload_name("x" * 300 + ".parquet")) == 128


def test_a_model_folder_is_its_regular_files_without_hidden_ones_or_subfolders(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / ".gitattributes").write_text("*")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    assert sorted(model_files(folder)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_model_folder_with_a_link_or_without_config_is_refused(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "weights.bin").symlink_to(folder / "model.safetensors")
    with pytest.raises(UploadError, match="weights.bin is a symbolic link"):
        model_files(folder)
    (folder / "weights.bin").unlink()
    (folder / "vocab (1).txt").write_text("x")
    with pytest.raises(UploadError, match=r"base_model: .*vocab \(1\).txt': each part letters"):
        model_files(folder)
    (folder / "vocab (1).txt").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(UploadError, match="has no config.json"):
        model_files(folder)


def test_finishing_checks_every_file_then_writes_the_marker_last(tmp_path):
    store = LocalStore(tmp_path / "store")
    folder = small_model(tmp_path / "m")
    with pytest.raises(Conflict, match=r"not complete: tokenizer.json \(not uploaded\)"):
        put_model(store, folder, leave_out="tokenizer.json")
    digest = folder_digest({n: file_sha256(p) for n, p in model_files(folder).items()})
    assert read_marker(store, digest) is None
    location = put_model(store, folder)
    assert location == store.uri(f"uploads/models/{digest}")
    assert sorted(read_marker(store, digest)["files"]) == sorted(model_files(folder))
    assert store.list("uploads/model-parts") == []  # the per-file records are dropped


def test_a_finished_models_files_cannot_change(tmp_path):
    store = LocalStore(tmp_path / "store")
    folder = small_model(tmp_path / "m")
    location = put_model(store, folder)
    digest = location.rsplit("/", 1)[1]
    other = tmp_path / "other.json"
    other.write_text('{"model_type": "bart"}')
    with pytest.raises(Conflict, match="is finished; its file 'config.json' cannot change"):
        store_model_file(store, other, digest=digest, path="config.json", sha256="0" * 64, size=1)
    assert store.get_bytes(f"uploads/models/{digest}/config.json") == b'{"model_type": "t5"}'


def test_a_manifest_of_another_digest_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(UploadError, match="the manifest's digest is"):
        finish_model(store, "0" * 64, {"config.json": "1" * 64})
    assert not store.exists(f"uploads/models/{'0' * 64}/{MARKER}")
