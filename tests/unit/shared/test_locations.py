"""Where a dataset may come from (shared/locations.py), checked at submission and again at
data-prep."""

import pytest

from shared.errors import StoreLocationError
from shared.locations import check_local, check_source
from shared.settings import Settings

STORE = "s3://store-bucket/termtune"


@pytest.fixture
def settings(tmp_path):
    return Settings(var_dir=tmp_path / "var", allowed_buckets=["datasets"])


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("s3://datasets/med/part-*.jsonl", "is a glob pattern"),
        (f"{STORE}/uploads/*.jsonl", "is a glob pattern"),
        ("s3://datasets/med/", "names a folder \\(prefix\\), not an object"),
        ("s3://datasets/", "names a folder \\(prefix\\), not an object"),
        (f"{STORE}/uploads/", "names a folder \\(prefix\\), not an object"),
    ],
)
def test_s3_globs_and_folders_are_refused_at_submission(settings, source, says):
    """They were accepted, then failed at data-prep with S3's bare 404 from HeadObject."""
    with pytest.raises(StoreLocationError, match=rf"dataset.source: .*{says}") as caught:
        check_source(source, store_root=STORE, settings=settings)
    assert "globs and folders are read from local paths only" in str(caught.value)


def test_one_s3_object_is_accepted(settings):
    assert check_source("s3://datasets/med/terms.jsonl", store_root=STORE, settings=settings)
    # a key with brackets is an object's name, as it is on a local disk
    assert check_source("s3://datasets/glossary[v2].jsonl", store_root=STORE, settings=settings)
    assert check_source(f"{STORE}/uploads/t.csv", store_root=STORE, settings=settings) == "store"


def test_an_existing_path_with_brackets_is_checked_as_itself(tmp_path):
    """A link named like a glob (``link[1].jsonl``) inside an allowed folder that points
    outside was checked by the part before its bracket alone, and let through."""
    allowed, outside = tmp_path / "allowed", tmp_path / "secret.jsonl"
    allowed.mkdir()
    outside.write_text("{}\n")
    (allowed / "link[1].jsonl").symlink_to(outside)
    (allowed / "terms[v2].jsonl").write_text("{}\n")
    settings = Settings(var_dir=tmp_path / "var", allowed_paths=[allowed])
    with pytest.raises(StoreLocationError, match="outside the allowed local folders"):
        check_local("src", str(allowed / "link[1].jsonl"), settings=settings)
    inside = check_local("src", str(allowed / "terms[v2].jsonl"), settings=settings)
    assert inside == allowed.resolve() / "terms[v2].jsonl"
    pattern = check_local("src", str(allowed / "t*.jsonl"), settings=settings)
    assert pattern == allowed.resolve() / "t"  # a pattern: its fixed part
