"""Data that tells the truth: column types, sampling, token lengths, unknown tokens, warnings."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.dataprep.handler import handle
from shared.errors import DatasetError, SpecError
from shared.messages import parse_message
from shared.modeling import load_tokenizer
from tests.factories import SAMPLE_DATA, make_spec
from tests.unit.services.test_dataprep import _command, _jsonl, _rows

SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
needs_glossaries = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the public glossaries are not at {SHARED_DATA}"
)
GLOSSARY = {"prompt_template": "What is {term}", "target_template": "{definition}"}


def _all_rows(ctx, manifest):
    tables = [
        pq.read_table(ctx.store.path(ctx.store.key_of(shard["uri"])))
        for split in manifest["shards"]
        for shard in manifest["shards"][split]
    ]
    return pa.concat_tables(tables).to_pylist()


def _prepared(ctx, tiny_model, job_id="job-1", **dataset):
    event = handle(_command(ctx, make_spec(tiny_model, dataset=dataset), job_id), ctx)
    return event, ctx.jobs.manifest(job_id, "prepare")


# --- column types ---------------------------------------------------------------------------


def _abbreviations(n=6):
    return {"page_title": ["2HG", "ALT", "AST", "BMI", "CBC", "CRP"][:n], "page_text": [18, 7] * 3}


def test_integer_parquet_column_fails_naming_file_column_and_type(ctx, tiny_model, tmp_path):
    path = tmp_path / "abbr.parquet"
    pq.write_table(pa.table(_abbreviations()), path)
    with pytest.raises(
        DatasetError,
        match=r"abbr.parquet: column 'page_text' is int64, not text; fix the data or set "
        r"dataset.cast_to_string: true \(or \[page_text\]\) to write its values as text",
    ):
        _prepared(ctx, tiny_model, source=str(path))
    assert ctx.store.list(ctx.jobs.stage_prefix("job-1", "prepare")) == []


def test_cast_to_string_turns_numbers_into_text_when_asked(ctx, tiny_model, tmp_path):
    path = tmp_path / "abbr.parquet"
    pq.write_table(pa.table(_abbreviations()), path)
    _, manifest = _prepared(ctx, tiny_model, source=str(path), cast_to_string=["page_text"])
    pairs = {r["prompt"]: r["target"] for r in _all_rows(ctx, manifest)}
    assert pairs["What is 2HG"] == "18"
    assert manifest["cast_to_string"] == ["page_text"]


def test_every_wrongly_typed_column_is_named(ctx, tiny_model, tmp_path):
    path = tmp_path / "types.parquet"
    pq.write_table(pa.table({"page_title": [1.5] * 4, "page_text": [[1, 2]] * 4}), path)
    with pytest.raises(DatasetError) as caught:
        _prepared(ctx, tiny_model, source=str(path))
    assert str(caught.value) == (
        f"{path}: column 'page_title' is double, not text; fix the data or set "
        "dataset.cast_to_string: true (or [page_title]) to write its values as text; "
        "column 'page_text' is list<element: int64>, not text; cast_to_string converts numbers "
        "and booleans only; fix the data"
    )


def test_wrong_type_in_a_later_file_of_a_glob_is_named(ctx, tiny_model, tmp_path):
    pq.write_table(
        pa.table({"page_title": ["a", "b"], "page_text": ["x", "y"]}), tmp_path / "p1.parquet"
    )
    pq.write_table(
        pa.table({"page_title": ["c", "d"], "page_text": [1.5, 2.5]}), tmp_path / "p2.parquet"
    )
    with pytest.raises(DatasetError, match=r"p2.parquet: column 'page_text' is double, not text"):
        _prepared(ctx, tiny_model, source=str(tmp_path / "p*.parquet"))


def test_jsonl_number_fails_naming_the_line(ctx, tiny_model, tmp_path):
    rows = _rows(4)
    rows[2]["page_text"] = 18
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DatasetError,
        match=r"d.jsonl: line 3: column 'page_text' is a JSON number \(18\), not text; fix the "
        r"data or set dataset.cast_to_string",
    ):
        _prepared(ctx, tiny_model, source=str(path))


def test_jsonl_numbers_and_booleans_cast_when_asked(ctx, tiny_model, tmp_path):
    rows = _rows(4) + [
        {"page_title": "2HG", "page_text": 18},
        {"page_title": "Flag", "page_text": True},
        {"page_title": 3.5, "page_text": "a float title"},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    _, manifest = _prepared(ctx, tiny_model, source=str(path), cast_to_string=True)
    pairs = {r["prompt"]: r["target"] for r in _all_rows(ctx, manifest)}
    assert pairs["What is 2HG"] == "18" and pairs["What is Flag"] == "true"
    assert pairs["What is 3.5"] == "a float title"


def test_json_lists_are_refused_even_with_a_cast(ctx, tiny_model, tmp_path):
    rows = _rows(3) + [{"page_title": "x", "page_text": [1, 2]}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DatasetError,
        match=r"d.jsonl: line 4: column 'page_text' is a JSON array, not text; "
        r"cast_to_string converts numbers and booleans only",
    ):
        _prepared(ctx, tiny_model, source=str(path), cast_to_string=True)


def test_json_array_file_names_the_row(ctx, tiny_model, tmp_path):
    rows = _rows(3)
    rows[1]["page_title"] = 7
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match=r"d.json: row 2: column 'page_title' is a JSON number"):
        _prepared(ctx, tiny_model, source=str(path))


def test_wrongly_typed_jsonl_rows_can_be_skipped_and_counted(ctx, tiny_model, tmp_path):
    rows = _rows(6) + [{"page_title": "2HG", "page_text": 18}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    event, manifest = _prepared(ctx, tiny_model, source=str(path), skip_bad_rows=True)
    assert manifest["bad_rows_skipped"] == 1 and event.bad_rows_skipped == 1
    assert sum(event.counts.values()) == 6


def test_csv_column_inferred_as_numbers_fails_and_casts_exactly(ctx, tiny_model, tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text("page_title,page_text\n" + "".join(f"T{i},00{i}\n" for i in range(6)))
    with pytest.raises(
        DatasetError, match=r"codes.csv: column 'page_text' is int64 \(inferred from its values\)"
    ):
        _prepared(ctx, tiny_model, source=str(path))
    _, manifest = _prepared(ctx, tiny_model, job_id="job-2", source=str(path), cast_to_string=True)
    pairs = {r["prompt"]: r["target"] for r in _all_rows(ctx, manifest)}
    assert pairs["What is T3"] == "003"  # the text as written, not int 3


def test_hub_dataset_column_of_numbers_fails_and_casts_when_asked(ctx, tiny_model, monkeypatch):
    import datasets

    rows = [{"code": f"C{i}", "count": i} for i in range(8)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    hub = {
        "source": "someone/codes",
        "prompt_template": "Count of {code}",
        "target_template": "{count}",
    }
    with pytest.raises(DatasetError, match=r"someone/codes: column 'count' is int64, not text"):
        _prepared(ctx, tiny_model, **hub)
    _, manifest = _prepared(ctx, tiny_model, job_id="job-2", **hub, cast_to_string=["count"])
    assert {r["prompt"]: r["target"] for r in _all_rows(ctx, manifest)}["Count of C3"] == "3"


def test_cast_to_string_names_only_template_columns():
    with pytest.raises(
        SpecError,
        match=r"dataset.cast_to_string.*'page_txt' is not a column the templates use "
        r"\(page_title, page_text\)",
    ):
        make_spec(Path("m"), dataset={"cast_to_string": ["page_txt"]})


# --- sampling -------------------------------------------------------------------------------


def _sampled_prompts(ctx, tiny_model, job_id, **dataset):
    _, manifest = _prepared(ctx, tiny_model, job_id=job_id, **dataset)
    return {r["prompt"] for r in _all_rows(ctx, manifest)}, manifest


def test_max_rows_takes_a_seeded_random_sample(ctx, tiny_model):
    first_40 = {
        "What is " + json.loads(line)["page_title"]
        for line in SAMPLE_DATA.read_text().splitlines()[:40]
    }
    a, manifest = _sampled_prompts(ctx, tiny_model, "a", max_rows=40)
    b, _ = _sampled_prompts(ctx, tiny_model, "b", max_rows=40)
    c, _ = _sampled_prompts(ctx, tiny_model, "c", max_rows=40, seed=7)
    assert len(a) == 40 and a == b and a != c
    assert len(a & first_40) < 20  # drawn from the whole file, not its head
    assert manifest["rows_read"] == 251
    assert manifest["sample"] == {"method": "random", "seed": 42, "rows": 40, "of": 251}


def test_sample_head_takes_the_first_rows(ctx, tiny_model):
    _, manifest = _sampled_prompts(ctx, tiny_model, "h", max_rows=40, sample="head")
    assert manifest["rows_read"] == 40
    assert manifest["sample"] == {"method": "head", "seed": None, "rows": 40, "of": None}


@needs_glossaries
def test_random_sample_of_a_glossary_spans_the_file(ctx, tiny_model):
    path = SHARED_DATA / "cdc_plain_language_thesaurus.jsonl"
    terms = [json.loads(line)["term"] for line in path.read_text().splitlines()]
    prompts, manifest = _sampled_prompts(
        ctx, tiny_model, "g", source=str(path), max_rows=100, **GLOSSARY
    )
    positions = sorted(terms.index(p.removeprefix("What is ")) for p in prompts)
    assert positions[-1] > 800 and positions[0] < 100  # the whole alphabet, not a-b
    assert manifest["sample"]["of"] == 891


# --- token lengths, unknown tokens, warnings --------------------------------------------------


def test_auto_lengths_pick_the_p99_under_the_cap(ctx, tiny_model):
    _, manifest = _prepared(ctx, tiny_model, max_target_length="auto", max_source_length="auto")
    target = manifest["lengths"]["target"]
    assert target["setting"] == "auto" and target["cap"] == 512
    assert target["max_length"] == target["p99"] < 512
    assert target["truncated_share"] <= 0.01
    assert target["reason"] == (
        f"auto: the p99 of 251 rows' target lengths is {target['p99']} tokens "
        f"(longest {target['max']}), within the cap 512 (dataset.max_target_length_cap)"
    )
    rows = _all_rows(ctx, manifest)
    assert max(len(r["labels"]) for r in rows) == target["max_length"]


def test_auto_length_above_the_cap_is_capped_and_warned(ctx, tiny_model):
    event, manifest = _prepared(ctx, tiny_model, max_target_length="auto", max_target_length_cap=16)
    target = manifest["lengths"]["target"]
    assert target["max_length"] == 16 and target["p99"] > 16
    assert target["reason"].startswith(
        f"auto: the p99 of 251 rows' target lengths is {target['p99']} tokens "
    )
    assert target["reason"].endswith("above the cap 16 (dataset.max_target_length_cap): capped")
    share = target["truncated_share"]
    warning = (
        f"target: {share:.1%} of rows are cut at 16 tokens (p99 {target['p99']}); raise "
        "dataset.max_target_length_cap"
    )
    assert warning in manifest["warnings"] and warning in event.warnings


def test_truncation_matches_the_tokenizer_and_counts_only_cut_rows(ctx, tiny_model):
    _, manifest = _prepared(ctx, tiny_model, max_target_length=64)
    tokenizer = load_tokenizer(str(tiny_model))
    rows = _all_rows(ctx, manifest)
    expected = tokenizer(text_target=[r["target"] for r in rows], max_length=64, truncation=True)[
        "input_ids"
    ]
    assert [r["labels"] for r in rows] == expected
    full = tokenizer(text_target=[r["target"] for r in rows])["input_ids"]
    cut = sum(len(ids) > 64 for ids in full) / len(full)
    assert manifest["lengths"]["target"]["truncated_share"] == round(cut, 4)
    warning = (
        f"target: {cut:.1%} of rows are cut at 64 tokens (p99 "
        f"{manifest['lengths']['target']['p99']}); raise dataset.max_target_length"
    )
    assert warning in manifest["warnings"]


def test_unknown_tokens_are_counted_per_split_and_warned(ctx, tiny_model, tmp_path):
    rows = _rows(30) + [
        {"page_title": f"Ω{i} ☃", "page_text": f"[{i}] ∑ ≈ ∞ ⊕ ⊗"} for i in range(10)
    ]
    _, manifest = _prepared(ctx, tiny_model, source=str(_jsonl(tmp_path / "odd.jsonl", rows)))
    tokenizer = load_tokenizer(str(tiny_model))
    shard_rows = _all_rows(ctx, manifest)
    ids = [t for r in shard_rows for t in r["input_ids"] + r["labels"]]
    unknown = sum(t == tokenizer.unk_token_id for t in ids)
    overall = manifest["unknown_tokens"]
    assert overall == {
        "unk_id": tokenizer.unk_token_id,
        "tokens": len(ids),
        "unknown": unknown,
        "share": round(unknown / len(ids), 4),
    }
    per_split = sum(
        manifest["tokens"][s][side]["unknown"]
        for s in manifest["tokens"]
        for side in ("source", "target")
    )
    assert per_split == unknown > 0
    assert (
        f"unknown tokens: {unknown / len(ids):.2%} of all tokens map to the tokenizer's "
        "unknown token <unk> (characters it cannot spell); check the text or the base model"
    ) in manifest["warnings"]


def test_event_carries_lengths_drops_bad_rows_and_warnings(ctx, tiny_model, tmp_path):
    rows = _rows(10) + [{"page_title": "Dup", "page_text": "x"}] * 2 + [{"page_title": ""}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    spec = make_spec(tiny_model, dataset={"source": str(path), "skip_bad_rows": True})
    command = _command(ctx, spec)
    event = handle(command, ctx)
    assert event.bad_rows_skipped == 1
    assert event.dropped == {"duplicate": 1, "empty_field": 1}
    assert set(event.tokens) == {"source", "target"}
    assert event.tokens["target"].max_length == 64 and event.tokens["target"].setting == "spec"
    assert parse_message(event.model_dump(mode="json")) == event
    assert handle(command, ctx).model_dump(exclude={"created_at", "message_id"}) == (
        event.model_dump(exclude={"created_at", "message_id"})
    )  # a redelivery reports the same from the manifest


def test_old_dataset_prepared_events_still_parse():
    old = {
        "type": "DatasetPrepared",
        "job_id": "j",
        "manifest": "file:///m",
        "counts": {"train": 2},
    }
    event = parse_message(old)
    assert event.warnings == [] and event.dropped == {} and event.bad_rows_skipped == 0


@needs_glossaries
@pytest.mark.parametrize("name", ["symptom_ontology.jsonl", "cdc_plain_language_thesaurus.jsonl"])
def test_glossaries_report_lengths_and_unknown_tokens(ctx, tiny_model, name):
    _, manifest = _prepared(
        ctx,
        tiny_model,
        source=str(SHARED_DATA / name),
        **GLOSSARY,
        max_target_length="auto",
        max_source_length="auto",
    )
    lengths, unknown = manifest["lengths"], manifest["unknown_tokens"]
    for side in ("source", "target"):
        assert lengths[side]["max_length"] == min(lengths[side]["p99"], lengths[side]["cap"])
        assert lengths[side]["truncated_share"] <= 0.01
    assert 0 < unknown["share"] < 0.2  # the tiny tokenizer never saw their characters
    warned = [w for w in manifest["warnings"] if w.startswith("unknown tokens: ")]
    assert len(warned) == (unknown["share"] > 0.005)
    assert not [w for w in manifest["warnings"] if w.startswith(("source:", "target:"))]


@needs_glossaries
def test_truncation_of_a_glossary_is_warned_in_the_event(ctx, tiny_model):
    path = SHARED_DATA / "symptom_ontology.jsonl"
    event, manifest = _prepared(ctx, tiny_model, source=str(path), **GLOSSARY, max_target_length=64)
    target = manifest["lengths"]["target"]
    assert target["truncated_share"] > 0.2  # definitions run to a paragraph
    assert event.warnings[0] == (
        f"target: {target['truncated_share']:.1%} of rows are cut at 64 tokens "
        f"(p99 {target['p99']}); raise dataset.max_target_length"
    )
    assert event.tokens["target"].truncated_share == target["truncated_share"]
