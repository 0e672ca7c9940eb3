"""Reading stage outputs back (issue 19): a damaged cached copy is fetched again; a damaged
stored one is the writing stage's CorruptOutput, which names the file and the stage."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.artifacts import adapter_dir, file_digests, read_split, sha256_of
from shared.errors import CorruptOutput
from shared.store import LocalStore, Store


class DownloadingStore(LocalStore):
    """A local store whose folders are downloaded into the cache, as S3's are."""

    local_dir = Store.local_dir


def _dataset(store, tmp_path):
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2]], "labels": [[3]]}), path)
    key = "jobs/j/prepare/train-00000.parquet"
    store.upload_file(path, key)
    shard = {"uri": store.uri(key), "rows": 1, "sha256": sha256_of(path)}
    return {"shards": {"train": [shard]}}, key


def test_a_damaged_cached_shard_is_fetched_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest, key = _dataset(store, tmp_path)
    cache = tmp_path / "cache"
    assert read_split(store, manifest, "train", cache_dir=cache).num_rows == 1
    cached = cache / "artifacts" / key
    cached.write_bytes(cached.read_bytes()[:10])  # this machine's copy, cut short
    assert read_split(store, manifest, "train", cache_dir=cache).num_rows == 1
    assert sha256_of(cached) == manifest["shards"]["train"][0]["sha256"]


@pytest.mark.parametrize("damage", ["cut short", "gone"])
def test_a_damaged_stored_shard_is_the_prepare_stages_corrupt_output(tmp_path, damage):
    store = LocalStore(tmp_path / "store")
    manifest, key = _dataset(store, tmp_path)
    if damage == "gone":
        store.delete(key)
    else:
        store.path(key).write_bytes(store.path(key).read_bytes()[:10])
    with pytest.raises(CorruptOutput, match="train-00000.parquet") as raised:
        read_split(store, manifest, "train", cache_dir=tmp_path / "cache")
    assert raised.value.stage == "prepare"


def test_max_rows_is_a_seeded_sample_spread_over_the_split(tmp_path):
    # The defect: the cap took the split's head, e.g. the first domain of a sorted source.
    store = LocalStore(tmp_path / "store")
    path = tmp_path / "test-00000.parquet"
    pq.write_table(pa.table({"target": [f"{i:03d}" for i in range(300)]}), path)
    key = "jobs/j/prepare/test-00000.parquet"
    store.upload_file(path, key)
    manifest = {"shards": {"test": [{"uri": store.uri(key), "sha256": sha256_of(path)}]}}

    def rows(**kwargs):
        table = read_split(store, manifest, "test", cache_dir=tmp_path / "cache", **kwargs)
        return [int(t) for t in table.column("target").to_pylist()]

    capped = rows(max_rows=30)
    assert len(capped) == 30 and capped == sorted(set(capped)) != list(range(30))
    assert capped == rows(max_rows=30)  # the same rows every run
    assert {i // 100 for i in capped} == {0, 1, 2}  # from every part of the split
    assert rows(max_rows=30, seed=1) != capped
    assert rows(max_rows=300) == rows() == list(range(300))


def _adapter(store, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    store.upload_dir(folder, "jobs/j/train/adapter")
    return {"adapter": store.uri("jobs/j/train/adapter"), "adapter_sha256": file_digests(folder)}


def test_an_adapter_is_checked_against_the_training_manifests_digests(tmp_path):
    store = DownloadingStore(tmp_path / "store")
    training = _adapter(store, tmp_path)
    cache = tmp_path / "cache"
    folder = adapter_dir(store, training, cache_dir=cache)
    assert folder == cache / "artifacts" / "jobs/j/train/adapter"
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"x" + weights.read_bytes()[1:])  # the cached copy, one byte off
    assert (
        sha256_of(adapter_dir(store, training, cache_dir=cache) / weights.name)
        == (training["adapter_sha256"]["adapter_model.safetensors"])
    )  # fetched again
    stored = store.path("jobs/j/train/adapter/adapter_model.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1])  # the store's own copy, cut short
    assert adapter_dir(store, training, cache_dir=cache)  # this machine's copy is whole
    with pytest.raises(CorruptOutput, match="adapter_model.safetensors does not match") as raised:
        adapter_dir(store, training, cache_dir=tmp_path / "another machine")
    assert raised.value.stage == "train"
    # A training manifest from before the digests: the weights must still be readable.
    old = {"adapter": training["adapter"]}
    with pytest.raises(CorruptOutput, match="adapter_model.safetensors cannot be read"):
        adapter_dir(LocalStore(tmp_path / "store"), old, cache_dir=cache)


def test_max_rows_keeps_each_sampled_prompt_whole(tmp_path):
    """It sampled rows: a term with several answers kept some of them, and the count of
    distinct prompts the gate judges on depended on the draw."""
    store = LocalStore(tmp_path / "store")
    path = tmp_path / "test-00000.parquet"
    prompts = [f"What is term {i // 3}?" for i in range(90)]  # 30 prompts x 3 answers
    prompts[1] = prompts[1].upper()  # one prompt in another case: data-prep's one group
    pq.write_table(pa.table({"prompt": prompts, "target": [str(i) for i in range(90)]}), path)
    key = "jobs/j/prepare/test-00000.parquet"
    store.upload_file(path, key)
    manifest = {"shards": {"test": [{"uri": store.uri(key), "sha256": sha256_of(path)}]}}
    for cap in (30, 31, 32, 8):
        table = read_split(store, manifest, "test", cache_dir=tmp_path / "cache", max_rows=cap)
        rows = [int(t) for t in table.column("target").to_pylist()]
        assert len(rows) == cap // 3 * 3 and rows == sorted(rows)
        kept = {r // 3 for r in rows}
        assert set(rows) == {3 * term + k for term in kept for k in range(3)}  # whole terms
