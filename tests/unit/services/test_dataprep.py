import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.dataprep import delimited, sources
from services.dataprep.handler import handle
from shared.errors import DatasetError, StoreLocationError
from shared.messages import PrepareDataset
from tests.factories import make_ctx, make_spec


def _command(ctx, spec, job_id="job-1"):
    return PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n, prefix="Term"):
    return [
        {"page_title": f"{prefix} {i}", "page_text": f"Definition number {i}."} for i in range(n)
    ]


def _shard(ctx, manifest, split):
    return pq.read_table(ctx.store.path(ctx.store.key_of(manifest["shards"][split][0]["uri"])))


def _nothing_stored(ctx, job_id="job-1"):
    return ctx.store.list(ctx.jobs.stage_prefix(job_id, "prepare")) == []


def test_prepares_grouped_split_with_manifest(ctx, tiny_model):
    event = handle(_command(ctx, make_spec(tiny_model)), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert event.counts == manifest["counts"] == {"train": 176, "test": 75}
    assert manifest["rows_read"] == 251 and manifest["split"]["distinct_prompts"] == 251
    assert manifest["inputs"][0]["sha256"] and manifest["inputs"][0]["bytes"] > 40_000
    train, test = _shard(ctx, manifest, "train"), _shard(ctx, manifest, "test")
    assert not set(train.column("prompt").to_pylist()) & set(test.column("prompt").to_pylist())
    row = train.slice(0, 1).to_pylist()[0]
    assert row["prompt"].startswith("What is ")
    assert row["input_ids"][-1] == 1 and row["labels"][-1] == 1  # eos, no padding
    assert len({len(r) for r in train.column("input_ids").to_pylist()}) > 1  # unpadded
    stats = manifest["tokens"]["train"]["target"]
    assert stats["max"] <= 64 and 0 < stats["truncated_share"] < 1
    assert stats["total"] == sum(len(x) for x in train.column("labels").to_pylist())


def test_same_prompt_with_two_answers_stays_in_one_split(ctx, tiny_model, tmp_path):
    rows = _rows(20) + [{"page_title": "term 3", "page_text": "Another answer."}]
    spec = make_spec(tiny_model, dataset={"source": str(_jsonl(tmp_path / "d.jsonl", rows))})
    handle(_command(ctx, spec), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert manifest["split"]["distinct_prompts"] == 20
    for split in ("train", "test"):
        prompts = [p.lower() for p in _shard(ctx, manifest, split).column("prompt").to_pylist()]
        assert prompts.count("what is term 3") in (0, 2)


def test_same_input_gives_same_digests(tmp_path, tiny_model):
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


def test_validation_split_is_grouped_too(ctx, tiny_model):
    event = handle(_command(ctx, make_spec(tiny_model, dataset={"validation_size": 0.1})), ctx)
    assert event.counts == {"train": 151, "validation": 25, "test": 75}


def test_splits_that_leave_no_train_rows_are_refused(ctx, tiny_model, tmp_path):
    path = _jsonl(tmp_path / "two.jsonl", _rows(2))
    spec = make_spec(tiny_model, dataset={"source": str(path), "validation_size": 0.2})
    with pytest.raises(DatasetError, match="2 distinct prompts cannot fill test"):
        handle(_command(ctx, spec), ctx)
    assert _nothing_stored(ctx)


def test_missing_file_is_named(ctx, tiny_model, tmp_path):
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DatasetError, match=r"file not found: .*missing.jsonl"):
        handle(_command(ctx, spec), ctx)
    assert ctx.jobs.manifest("job-1", "prepare") is None


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_missing_column_lists_columns_found(ctx, tiny_model, tmp_path, suffix):
    rows = _rows(5)
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _jsonl(path, rows)
    else:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, path) if suffix == "parquet" else pa.csv.write_csv(table, path)
    spec = make_spec(tiny_model, dataset={"source": str(path), "prompt_template": "Define {term}"})
    with pytest.raises(
        DatasetError, match=r"no column 'term'; columns found: page_title, page_text"
    ):
        handle(_command(ctx, spec), ctx)
    assert _nothing_stored(ctx)


def test_malformed_jsonl_line_is_named(ctx, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows(1)[0]) + "\n{not json\n[1, 2]\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: not a JSON object"):
        handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(bad)})), ctx)
    assert _nothing_stored(ctx)


def test_malformed_lines_can_be_skipped_and_counted(ctx, tiny_model, tmp_path):
    path = tmp_path / "some-bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(10)) + "{oops\n\n[1]\n")
    spec = make_spec(tiny_model, dataset={"source": str(path), "skip_bad_rows": True})
    handle(_command(ctx, spec), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert manifest["bad_rows_skipped"] == 2 and sum(manifest["counts"].values()) == 10


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_bytes_that_are_not_utf8_are_located(ctx, tiny_model, tmp_path, suffix):
    path = tmp_path / f"latin1.{suffix}"
    head = (
        (json.dumps(_rows(1)[0]) + "\n").encode()
        if suffix == "jsonl"
        else (b"page_title,page_text\nA,b\n")
    )
    path.write_bytes(
        head + b'{"page_title": "caf\xe9", "page_text": "x"}\n'
        if suffix == "jsonl"
        else head + b"caf\xe9,x\n"
    )
    offset = len(head) + (19 if suffix == "jsonl" else 3)
    spec = make_spec(tiny_model, dataset={"source": str(path)})
    with pytest.raises(DatasetError, match=rf"latin1.{suffix}.*not UTF-8 at byte offset {offset}"):
        handle(_command(ctx, spec), ctx)


def test_parquet_column_of_wrong_type_is_named(ctx, tiny_model, tmp_path):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"page_title": ["a", "b"], "page_text": [[1, 2], [3]]}), path)
    spec = make_spec(tiny_model, dataset={"source": str(path)})
    with pytest.raises(
        DatasetError,
        match=r"typed.parquet: column 'page_text' is list<.*int64>, not text; "
        r"cast_to_string converts numbers and booleans only",
    ):
        handle(_command(ctx, spec), ctx)


def test_empty_file_is_refused(ctx, tiny_model, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DatasetError, match=r"empty.jsonl is empty"):
        handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(path)})), ctx)


def test_dataset_empty_after_cleaning_is_refused(ctx, tiny_model, tmp_path):
    path = _jsonl(tmp_path / "blank.jsonl", [{"page_title": " ", "page_text": "x"}] * 3)
    with pytest.raises(DatasetError, match=r"0 usable rows after cleaning \(of 3 read"):
        handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(path)})), ctx)
    assert _nothing_stored(ctx)


def test_csv_parquet_and_glob_sources(ctx, tiny_model, tmp_path):
    rows = _rows(10)
    pa.csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "terms.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "terms.parquet")
    _jsonl(tmp_path / "part-1.jsonl", _rows(6, "A"))
    _jsonl(tmp_path / "part-2.jsonl", _rows(4, "B"))
    cases = {"terms.csv": 10, "terms.parquet": 10, "part-*.jsonl": 10}
    for n, (name, expected) in enumerate(cases.items()):
        spec = make_spec(tiny_model, dataset={"source": str(tmp_path / name)})
        event = handle(_command(ctx, spec, job_id=f"job-{n}"), ctx)
        assert sum(event.counts.values()) == expected
    assert len(ctx.jobs.manifest("job-2", "prepare")["inputs"]) == 2


def test_glob_without_match_is_named(ctx, tiny_model, tmp_path):
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "nothing-*.jsonl")})
    with pytest.raises(DatasetError, match=r"no file matches .*nothing-\*.jsonl"):
        handle(_command(ctx, spec), ctx)


def test_cleaning_rules_count_what_they_touch(ctx, tiny_model, tmp_path):
    rows = [
        {"page_title": "Cafe\u0301", "page_text": "Coffee   house.[1]\n\nSee also\nTea"},
        {"page_title": "Dup", "page_text": "Same."},
        {"page_title": "Dup", "page_text": "Same."},
        {"page_title": "Short", "page_text": "x"},
        {"page_title": "", "page_text": "No title"},
    ] + _rows(6)
    spec = make_spec(
        tiny_model,
        dataset={
            "source": str(_jsonl(tmp_path / "c.jsonl", rows)),
            "strip_wiki_artifacts": True,
            "min_target_chars": 3,
        },
    )
    handle(_command(ctx, spec), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert manifest["cleaning"] == {
        "dropped_duplicate": 1,
        "dropped_empty_field": 1,
        "dropped_too_short": 1,
        "unicode_nfc": 1,
        "whitespace": 1,
        "wiki_artifacts": 1,
    }
    rows = [r for s in manifest["shards"] for r in _shard(ctx, manifest, s).to_pylist()]
    cafe = next(r for r in rows if r["prompt"] == "What is Caf\u00e9")
    assert cafe["target"] == "Coffee house."


def test_max_rows_with_sample_head_reads_only_the_first_rows(ctx, tiny_model):
    spec = make_spec(tiny_model, dataset={"max_rows": 40, "sample": "head"})
    event = handle(_command(ctx, spec), ctx)
    assert sum(event.counts.values()) == 40
    assert ctx.jobs.manifest("job-1", "prepare")["rows_read"] == 40


def test_store_uri_source(ctx, tiny_model):
    ctx.store.put_bytes(
        "uploads/terms.jsonl", "".join(json.dumps(r) + "\n" for r in _rows(10)).encode()
    )
    spec = make_spec(tiny_model, dataset={"source": ctx.store.uri("uploads/terms.jsonl")})
    assert sum(handle(_command(ctx, spec), ctx).counts.values()) == 10


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("s3://other-bucket/terms.jsonl", "outside the object store and the allowed buckets"),
        ("s3://allowed/../x.jsonl", "'..' or control-character part in its key"),
        # found by the fuzzed locations: decoded twice it is ".."; a typo is not a folder
        ("s3://allowed/%252e%252e/x.jsonl", "'..' or control-character part in its key"),
        ("s3:/allowed/x.jsonl", "not a plain s3://bucket/key URI"),
    ],
)
def test_s3_outside_allowed_buckets_is_refused(ctx, tiny_model, uri, reason):
    ctx.settings.allowed_buckets = ["allowed"]
    spec = make_spec(tiny_model, dataset={"source": uri})
    with pytest.raises(StoreLocationError, match=reason):
        handle(_command(ctx, spec), ctx)
    assert _nothing_stored(ctx)


def test_local_paths_outside_the_allowed_folders_are_refused(ctx, tiny_model, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _jsonl(allowed / "ok.jsonl", _rows(30))
    _jsonl(tmp_path / "secret.jsonl", _rows(30))
    (allowed / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    ctx.settings.allowed_paths = [allowed]
    for n, source in enumerate(
        [
            str(tmp_path / "secret.jsonl"),
            str(allowed / ".." / "secret.jsonl"),
            str(allowed / "link.jsonl"),
            f"file://{tmp_path}/secret.jsonl",
            str(allowed / "*.jsonl"),  # the glob matches the link too
        ]
    ):
        spec = make_spec(tiny_model, dataset={"source": source})
        with pytest.raises(StoreLocationError, match="outside the allowed local folders"):
            handle(_command(ctx, spec, job_id=f"job-{n}"), ctx)
        assert _nothing_stored(ctx, job_id=f"job-{n}")
    inside = make_spec(tiny_model, dataset={"source": str(allowed / "ok.jsonl")})
    assert handle(_command(ctx, inside, job_id="inside"), ctx).counts["train"] > 0


def test_production_refuses_local_paths_unless_folders_are_allowed(ctx, tiny_model):
    ctx.settings.environment = "production"
    spec = make_spec(tiny_model)
    with pytest.raises(StoreLocationError, match="none \\(TERMTUNE_ALLOWED_PATHS\\)"):
        handle(_command(ctx, spec), ctx)


def test_s3_source_in_an_allowed_bucket(ctx, tiny_model, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {
            "AWS_ACCESS_KEY_ID": "t",
            "AWS_SECRET_ACCESS_KEY": "t",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        ctx.settings.s3_endpoint_url = f"http://{host}:{port}"
        ctx.settings.allowed_buckets = ["datasets"]
        s3 = boto3.client("s3", endpoint_url=ctx.settings.s3_endpoint_url)
        s3.create_bucket(Bucket="datasets")
        body = "".join(json.dumps(r) + "\n" for r in _rows(12)).encode()
        for n, key in enumerate(("med/terms.jsonl", "med/glossary[v2].jsonl")):  # as written
            s3.put_object(Bucket="datasets", Key=key, Body=body)
            spec = make_spec(tiny_model, dataset={"source": f"s3://datasets/{key}"})
            assert sum(handle(_command(ctx, spec, f"job-{n}"), ctx).counts.values()) == 12
        spec = make_spec(tiny_model, dataset={"source": "s3://datasets/med/gone.jsonl"})
        with pytest.raises(DatasetError) as caught:  # was S3's bare "(404) ... Not Found"
            handle(_command(ctx, spec, "job-gone"), ctx)
        assert str(caught.value) == (
            "dataset.source: no object s3://datasets/med/gone.jsonl (an s3:// source names one "
            "object, its key as written)"
        )
    finally:
        server.stop()


def test_hub_source_unreachable_suggests_local_file(ctx, tiny_model, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = make_spec(tiny_model, dataset={"source": "gamino/wiki_medical_terms"})
    with pytest.raises(DatasetError, match=r"gamino/wiki_medical_terms.*local file"):
        handle(_command(ctx, spec), ctx)


def test_hub_source_reads_through_datasets(ctx, tiny_model, monkeypatch):
    import datasets

    calls = []

    def load(path, name, split, revision):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(_rows(10))

    monkeypatch.setattr(datasets, "load_dataset", load)
    spec = make_spec(
        tiny_model,
        dataset={"source": "gamino/wiki_medical_terms", "revision": "main", "subset": "default"},
    )
    assert sum(handle(_command(ctx, spec), ctx).counts.values()) == 10
    assert calls == [("gamino/wiki_medical_terms", "default", "train", "main")]


def test_first_invalid_utf8_offset(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes("é".encode() * 10 + b"\xff" + b"tail")
    assert sources.first_invalid_utf8(path) == 20
    path.write_bytes("fine ✓".encode())
    assert sources.first_invalid_utf8(path) is None


def test_leakage_check_counts_prompts_found_in_two_splits(tmp_path):
    from services.dataprep.handler import _ShardWriter
    from shared.store import LocalStore

    writer = _ShardWriter(LocalStore(tmp_path / "s"), tmp_path, "jobs/j/prepare")
    table = pa.table({"prompt": ["p"], "target": ["t"], "input_ids": [[1]], "labels": [[1]]})
    writer.add("train", table, keys=[b"a" * 16])
    writer.add("test", table, keys=[b"b" * 16])
    assert writer.shared_keys() == 0
    writer.add("validation", table, keys=[b"a" * 16])
    assert writer.shared_keys() == 1


def test_a_2mb_row_is_truncated_not_fatal(ctx, tiny_model, tmp_path):
    rows = _rows(9) + [{"page_title": "Huge", "page_text": "word " * 420_000}]
    path = _jsonl(tmp_path / "huge.jsonl", rows)
    assert path.stat().st_size > 2_000_000
    handle(_command(ctx, make_spec(tiny_model, dataset={"source": str(path)})), ctx)
    manifest = ctx.jobs.manifest("job-1", "prepare")
    assert sum(manifest["counts"].values()) == 10
    assert max(manifest["tokens"][s]["target"]["max"] for s in manifest["tokens"]) == 64


def test_missing_jsonl_column_fails_before_the_tokenizer_loads(ctx, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"term": "a", "definition": "b"}] * 3)
    spec = make_spec(tmp_path / "no-model-here", dataset={"source": str(path)})
    with pytest.raises(
        DatasetError,
        match=r"no column 'page_title', 'page_text'; columns found: "
        r"term, definition",
    ):
        handle(_command(ctx, spec), ctx)


def test_errors_never_quote_the_files_content(ctx, tiny_model, tmp_path):
    """Issue 19: a dataset that was a link to /etc/passwd failed with one of its lines in the
    job's error, which every user of the API reads."""
    secret = "root:x:0:0:SECRET-LINE:/root:/bin/bash"
    (tmp_path / "system.txt").write_text(f"page_title,page_text\n{secret},two,three\n")
    (tmp_path / "terms.csv").symlink_to(tmp_path / "system.txt")
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "terms.csv")})
    with pytest.raises(DatasetError) as caught:
        handle(_command(ctx, spec), ctx)
    assert "terms.csv: line 2: expected 2 fields, found 3" in str(caught.value)
    assert "SECRET-LINE" not in str(caught.value)


def _read(ctx, tiny_model, source):
    """Every row the source yields, by column (no tokenizing: the reader alone)."""
    spec = make_spec(tiny_model, dataset={"source": str(source)})
    opened = sources.open_source(spec.dataset, store=ctx.store, settings=ctx.settings)
    rows: dict[str, list] = {}
    for batch in opened.batches():
        for name, values in batch.items():
            rows.setdefault(name, []).extend(values)
    return rows


def test_a_csv_past_one_read_block_keeps_quoted_line_breaks_and_late_text(
    ctx, tiny_model, tmp_path
):
    """pyarrow reads a CSV 4 MiB at a time: without being told, it split blocks inside quoted
    values that hold line breaks, and typed every column by the first block alone, so an
    unused column empty or numeric there and text later failed the whole file."""
    import csv

    path = tmp_path / "glossary.csv"
    n, late = 2000, 1900  # about 5 MB: the late rows are past the first block
    with path.open("w", newline="") as handle_:
        writer = csv.writer(handle_)
        writer.writerow(["page_title", "page_text", "notes", "code"])
        for i in range(n):
            text = f"First line of {i}.\nSecond line: " + "word " * 500
            writer.writerow(
                [f"Term {i}", text, "see also x" if i >= late else "", f"A{i}" if i >= late else i]
            )
    assert path.stat().st_size > 1 << 22
    rows = _read(ctx, tiny_model, path)
    assert len(rows["page_title"]) == n and rows["page_title"][-1] == f"Term {n - 1}"
    assert rows["page_text"][n - 1].startswith(f"First line of {n - 1}.\nSecond line: word")
    assert rows["notes"][late] == "see also x" and rows["code"][late] == f"A{late}"


def test_unreadable_parquet_files_are_named(ctx, tiny_model, tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1xx")
    spec = make_spec(tiny_model, dataset={"source": str(junk)})
    with pytest.raises(DatasetError, match=r"junk.parquet: not a readable Parquet file"):
        handle(_command(ctx, spec), ctx)
    parts = tmp_path / "parts"
    parts.mkdir()
    long_rows = [{"page_title": f"Term {i}", "page_text": "x" * 400} for i in range(50)]
    for name in ("a", "b"):
        pq.write_table(
            pa.Table.from_pylist(long_rows), parts / f"{name}.parquet", compression="none"
        )
    data = bytearray((parts / "b.parquet").read_bytes())
    data[200:3000] = b"\xff" * 2800  # its data pages scribbled over, its footer whole
    (parts / "b.parquet").write_bytes(bytes(data))
    spec = make_spec(tiny_model, dataset={"source": str(parts / "*.parquet")})
    with pytest.raises(DatasetError, match=r"b.parquet: cannot read"):
        handle(_command(ctx, spec, job_id="job-2"), ctx)
    assert _nothing_stored(ctx, "job-2")


def test_a_byte_order_mark_opens_jsonl_and_json_files_as_editors_write_them(
    ctx, tiny_model, tmp_path
):
    rows = _rows(5)
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (lines, array):
        assert _read(ctx, tiny_model, path)["page_title"] == [r["page_title"] for r in rows]


def test_a_later_file_of_a_glob_without_a_template_column_is_refused(ctx, tiny_model, tmp_path):
    """Its rows were dropped one by one as empty, and the job went on without them."""
    _jsonl(tmp_path / "part-1.jsonl", _rows(6, "A"))
    _jsonl(tmp_path / "part-2.jsonl", [{"page_title": "B", "text": "renamed"}] * 4)
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "part-*.jsonl")})
    with pytest.raises(
        DatasetError,
        match=r"part-2.jsonl: no column 'page_text' \(columns found: page_title, text\)",
    ):
        handle(_command(ctx, spec), ctx)
    assert _nothing_stored(ctx)


def test_a_jsonl_whose_first_row_leaves_out_a_column_is_read(ctx, tiny_model, tmp_path):
    """An exporter that drops null keys: the first row has no page_text, the rest do."""
    rows = [{"page_title": "Empty"}] + _rows(12)
    spec = make_spec(tiny_model, dataset={"source": str(_jsonl(tmp_path / "sparse.jsonl", rows))})
    event = handle(_command(ctx, spec), ctx)
    assert sum(event.counts.values()) == 12
    assert ctx.jobs.manifest("job-1", "prepare")["cleaning"]["dropped_empty_field"] == 1


def test_a_stored_source_is_checked_as_a_local_file_is(ctx, tiny_model):
    """A stored .txt holding JSONL was read as CSV, and the error quoted its first line."""
    rows = "".join(json.dumps(r) + "\n" for r in _rows(10)).encode()
    ctx.store.put_bytes("uploads/terms.txt", rows)
    ctx.store.put_bytes("uploads/empty.jsonl", b"")
    for key, says in (("terms.txt", "unsupported file type '.txt'"), ("empty.jsonl", "is empty")):
        uri = ctx.store.uri(f"uploads/{key}")
        spec = make_spec(tiny_model, dataset={"source": uri})
        with pytest.raises(DatasetError, match=rf"dataset.source: {uri}:? {says}") as refused:
            handle(_command(ctx, spec, job_id=f"job-{key[0]}"), ctx)
        assert "Definition number" not in str(refused.value)
    cached = list((ctx.settings.cache_dir / "sources").rglob("*"))
    assert not [p for p in cached if p.name.endswith(".part")]  # renamed into place


def test_a_lone_surrogate_in_jsonl_is_named_by_line_and_column(ctx, tiny_model, tmp_path):
    """Valid JSON that decodes to no text: it failed with a raw UnicodeEncodeError."""
    path = tmp_path / "surrogate.jsonl"
    rows = [json.dumps(r) for r in _rows(12)]
    rows[3] = '{"page_title": "gam\\ud800ma", "page_text": "A definition."}'
    path.write_text("\n".join(rows) + "\n")
    spec = make_spec(tiny_model, dataset={"source": str(path)})
    with pytest.raises(DatasetError, match=r"surrogate.jsonl: line 4: column 'page_title' holds"):
        handle(_command(ctx, spec), ctx)
    skip = make_spec(tiny_model, dataset={"source": str(path), "skip_bad_rows": True})
    assert sum(handle(_command(ctx, skip, job_id="job-2"), ctx).counts.values()) == 11


def test_a_csv_column_of_dates_is_read_as_written_when_cast_is_asked(ctx, tiny_model, tmp_path):
    """pyarrow reads a column of dates as date32: for a CSV the error offered no fix,
    though cast_to_string, which reads the column as written, is one."""
    rows = [{"page_title": f"2024-01-{i + 1:02d}", "page_text": f"Day {i}."} for i in range(12)]
    pa.csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "days.csv")
    spec = make_spec(tiny_model, dataset={"source": str(tmp_path / "days.csv")})
    with pytest.raises(DatasetError, match=r"'page_title' is date32.*set dataset.cast_to_string"):
        handle(_command(ctx, spec), ctx)
    cast = make_spec(
        tiny_model, dataset={"source": str(tmp_path / "days.csv"), "cast_to_string": True}
    )
    assert sum(handle(_command(ctx, cast, job_id="job-2"), ctx).counts.values()) == 12


def test_a_csv_header_naming_a_column_twice_is_refused(ctx, tiny_model, tmp_path):
    """The second column of the name stood for both: prompts came from the wrong one."""
    path = tmp_path / "twice.csv"
    path.write_text("page_title,page_title,page_text\n" + "a,b,Some definition.\n" * 12)
    spec = make_spec(tiny_model, dataset={"source": str(path)})
    with pytest.raises(
        DatasetError, match=r"twice.csv: columns named twice in its header: page_title"
    ):
        handle(_command(ctx, spec), ctx)


def test_a_disk_error_reading_a_csv_is_not_called_the_files_fault(tmp_path, monkeypatch):
    """An OSError while reading a CSV (EIO, a full disk) is the machine's: it stays an
    OSError, retried with the stage, not a DatasetError that fails the job for good."""
    path = tmp_path / "terms.csv"
    path.write_text("page_title,page_text\nA,B\n")

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(delimited.pacsv, "open_csv", failing)
    with pytest.raises(OSError, match="Input/output error"):  # a DatasetError is no OSError
        list(sources._arrow_batches(path))
