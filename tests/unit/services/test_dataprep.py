import json

import pyarrow.parquet as pq
import pytest

from services.dataprep.handler import handle
from shared.errors import DatasetError
from shared.messages import PrepareDataset
from tests.factories import make_spec


def _command(ctx, spec, job_id="job-1"):
    return PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))


def test_prepares_grouped_split_with_manifest(ctx, tiny_model):
    event = handle(_command(ctx, make_spec(tiny_model)), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert event.counts == manifest["counts"] == {"train": 176, "test": 75}
    assert manifest["split"]["shared_prompts"] == 0
    assert manifest["rows_read"] == 251
    train = pq.read_table(ctx.store.path(ctx.store.key_of(manifest["shards"]["train"][0]["uri"])))
    test = pq.read_table(ctx.store.path(ctx.store.key_of(manifest["shards"]["test"][0]["uri"])))
    assert not set(train.column("prompt").to_pylist()) & set(test.column("prompt").to_pylist())
    row = train.slice(0, 1).to_pylist()[0]
    assert row["prompt"].startswith("What is ")
    assert row["input_ids"][-1] == 1 and row["labels"][-1] == 1  # eos, no padding
    lengths = {len(r) for r in train.column("input_ids").to_pylist()}
    assert len(lengths) > 1  # unpadded
    assert manifest["tokens"]["train"]["target"]["max"] <= 64


def test_same_input_gives_same_digests(tmp_path, tiny_model):
    from tests.factories import make_ctx

    digests = []
    for n in range(2):
        ctx = make_ctx(tmp_path / f"v{n}")
        handle(_command(ctx, make_spec(tiny_model)), ctx)
        shards = ctx.jobs.manifest("job-1", "prepare")["shards"]
        digests.append([s["sha256"] for split in ("train", "test") for s in shards[split]])
    assert digests[0] == digests[1]


def test_rerun_with_manifest_is_a_no_op(ctx, tiny_model):
    cmd = _command(ctx, make_spec(tiny_model))
    handle(cmd, ctx)
    key = ctx.jobs.manifest_key("job-1", "prepare")
    before = ctx.store.path(key).stat().st_mtime_ns
    again = handle(cmd, ctx)
    assert ctx.store.path(key).stat().st_mtime_ns == before
    assert again.counts == {"train": 176, "test": 75}


def test_missing_file_is_named(ctx, tiny_model, tmp_path):
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DatasetError, match=r"file not found: .*missing.jsonl"):
        handle(_command(ctx, spec), ctx)
    assert ctx.jobs.manifest("job-1", "prepare") is None


def test_missing_column_lists_columns_found(ctx, tiny_model):
    spec = make_spec(tiny_model, dataset={"prompt_template": "Define {term}"})
    with pytest.raises(
        DatasetError, match=r"no column 'term'; columns found: page_title, page_text"
    ):
        handle(_command(ctx, spec), ctx)


def test_malformed_jsonl_names_the_file(ctx, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"page_title": "A", "page_text": "B"}) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"cannot read .*bad.jsonl"):
        handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(bad)})), ctx)


def test_csv_and_parquet_sources(ctx, tiny_model, tmp_path):
    import pyarrow as pa

    rows = [{"page_title": f"Term {i}", "page_text": f"Definition number {i}."} for i in range(10)]
    csv = tmp_path / "terms.csv"
    csv.write_text(
        "page_title,page_text\n" + "".join(f"{r['page_title']},{r['page_text']}\n" for r in rows)
    )
    parquet = tmp_path / "terms.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for n, source in enumerate([csv, parquet]):
        event = handle(
            _command(
                ctx, make_spec(tiny_model, dataset={"source": str(source)}), job_id=f"job-{n}"
            ),
            ctx,
        )
        assert event.counts == {"train": 7, "test": 3}


def test_empty_rows_and_duplicates_are_dropped_and_counted(ctx, tiny_model, tmp_path):
    rows = [{"page_title": f"T{i}", "page_text": f"D{i}"} for i in range(6)]
    rows += [{"page_title": "T0", "page_text": "D0"}, {"page_title": "", "page_text": "x"}]
    path = tmp_path / "dupes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(path)})), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert manifest["dropped"] == {"empty_field": 1, "duplicate": 1}
    assert sum(manifest["counts"].values()) == 6


def test_hub_source_unreachable_suggests_local_file(ctx, tiny_model, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = make_spec(tiny_model, dataset={"source": "gamino/wiki_medical_terms"})
    with pytest.raises(DatasetError, match=r"gamino/wiki_medical_terms.*local file"):
        handle(_command(ctx, spec), ctx)


def test_validation_split_is_grouped_too(ctx, tiny_model):
    spec = make_spec(tiny_model, dataset={"validation_size": 0.1})
    event = handle(_command(ctx, spec), ctx)
    assert event.counts == {"train": 151, "validation": 25, "test": 75}
    assert ctx.jobs.manifest("job-1", "prepare")["split"]["shared_prompts"] == 0


def test_splits_that_leave_no_train_rows_are_refused(ctx, tiny_model, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(
        '{"page_title": "A", "page_text": "a"}\n{"page_title": "B", "page_text": "b"}\n'
    )
    spec = make_spec(tiny_model, dataset={"source": str(path), "validation_size": 0.2})
    with pytest.raises(DatasetError, match="2 distinct prompts cannot fill test"):
        handle(_command(ctx, spec), ctx)
