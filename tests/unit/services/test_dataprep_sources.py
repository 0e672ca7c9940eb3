"""The dataset reader alone (services/dataprep/sources.py): no tokenizer, no handler."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.dataprep import sources
from shared.errors import DatasetError
from shared.jobspec import DatasetSpec

TERMS = {"prompt_template": "What is {term}?", "target_template": "{definition}"}

#: a plain TSV (cut, awk, a database export): a cell that opens with a quote, no quoting
STRAY_QUOTE = (
    b"term\tdefinition\n"
    b"acute\tsudden\n"
    b'"Smart drug\ta drug said to boost thinking\n'
    b"benign\tnot harmful\n"
    b'"Hot" flush\ta sudden feeling of heat\n'
    b"chronic\tlong-lasting\n"
)


def _read(ctx, source, **dataset):
    """(term, definition) of every row the source yields."""
    spec = DatasetSpec(source=str(source), **TERMS, **dataset)
    opened = sources.open_source(spec, store=ctx.store, settings=ctx.settings)
    rows = [r for b in opened.batches() for r in zip(b["term"], b["definition"], strict=True)]
    return rows, opened


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_stray_quote_in_a_plain_tsv_is_refused_naming_its_line(ctx, tmp_path):
    """Read with CSV quoting, the quote on line 3 swallowed the lines up to the next quote
    into one row: fewer rows, no error."""
    path = _write(tmp_path / "terms.tsv", STRAY_QUOTE)
    with pytest.raises(DatasetError, match=r"terms.tsv: line 3: a quoted cell spans lines") as e:
        _read(ctx, path)
    assert "dataset.tsv_quoting: none" in str(e.value) and "sudden feeling" not in str(e.value)


def test_a_plain_tsv_read_without_quoting_keeps_every_row_and_its_quotes(ctx, tmp_path):
    path = _write(tmp_path / "terms.tsv", STRAY_QUOTE)
    rows, _ = _read(ctx, path, tsv_quoting="none")
    assert rows == [
        ("acute", "sudden"),
        ('"Smart drug', "a drug said to boost thinking"),
        ("benign", "not harmful"),
        ('"Hot" flush', "a sudden feeling of heat"),
        ("chronic", "long-lasting"),
    ]


@pytest.mark.parametrize("quoting", ["auto", "csv"])
def test_a_tsv_quoted_as_pandas_writes_it_is_read_unquoted(ctx, tmp_path, quoting):
    """pandas' to_csv(sep="\\t") quotes a cell holding a quote and doubles the quote."""
    path = _write(
        tmp_path / "terms.tsv",
        b'term\tdefinition\n"""Bad"" cholesterol"\t"LDL, ""the bad kind"""\nacute\tsudden\n',
    )
    rows, _ = _read(ctx, path, tsv_quoting=quoting)
    assert rows == [('"Bad" cholesterol', 'LDL, "the bad kind"'), ("acute", "sudden")]


def test_quoted_tsv_cells_spanning_lines_need_csv_quoting(ctx, tmp_path):
    path = _write(
        tmp_path / "terms.tsv",
        b'term\tdefinition\nacute\tsudden\n"tab\there"\t"line one\nline two"\nbenign\tmild\n',
    )
    rows, _ = _read(ctx, path, tsv_quoting="csv")
    assert rows == [("acute", "sudden"), ("tab\there", "line one\nline two"), ("benign", "mild")]
    with pytest.raises(DatasetError, match=r"terms.tsv: line 3: .*tsv_quoting: none .* or csv"):
        _read(ctx, path)


def test_a_row_with_the_wrong_number_of_fields_is_named_by_its_line(ctx, tmp_path):
    """pyarrow names no line; the quoted line break makes the row's line differ from its
    number."""
    path = _write(
        tmp_path / "terms.csv",
        b'term,definition\n"multi\nline",x\nacute,sudden,SECRET\nbenign,mild\n',
    )
    with pytest.raises(DatasetError, match=r"terms.csv: line 4: expected 2 fields, found 3$") as e:
        _read(ctx, path)
    assert "SECRET" not in str(e.value)


def test_an_unclosed_quote_in_a_tsv_names_its_line_and_the_fix(ctx, tmp_path):
    path = _write(tmp_path / "terms.tsv", b'term\tdefinition\n"Smart drug\tboosts\nacute\tsudden\n')
    with pytest.raises(
        DatasetError, match=r"terms.tsv: line 2: expected 2 fields, found 1.*tsv_quoting: none"
    ):
        _read(ctx, path)
    assert _read(ctx, path, tsv_quoting="none")[0][0] == ('"Smart drug', "boosts")


def test_an_existing_file_name_with_brackets_is_no_glob(ctx, tmp_path):
    (tmp_path / "glossary[v2].jsonl").write_text(
        '{"term": "acute", "definition": "sudden"}\n{"term": "benign", "definition": "mild"}\n'
    )
    (tmp_path / "glossary2.jsonl").write_text('{"term": "wrong", "definition": "file"}\n')
    rows, opened = _read(ctx, tmp_path / "glossary[v2].jsonl")
    assert rows == [("acute", "sudden"), ("benign", "mild")]
    assert opened.files == [tmp_path / "glossary[v2].jsonl"]
    rows, _ = _read(ctx, tmp_path / "glossary*.jsonl")  # a pattern is still one
    assert len(rows) == 3


@pytest.mark.parametrize("kind", [pa.string_view(), pa.large_string()])
@pytest.mark.parametrize("cast", [False, True])
def test_parquet_string_view_and_large_string_columns_are_text(ctx, tmp_path, kind, cast):
    """Polars writes string_view columns by default."""
    path = tmp_path / "terms.parquet"
    table = pa.table(
        {"term": pa.array(["acute", "benign"], kind), "definition": pa.array(["a", "b"], kind)}
    )
    pq.write_table(table, path)
    rows, _ = _read(ctx, path, cast_to_string=cast)
    assert rows == [("acute", "a"), ("benign", "b")]


def _array(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_a_json_arrays_element_that_is_no_object_is_named(ctx, tmp_path):
    row = {"term": "acute", "definition": "sudden"}
    path = _array(tmp_path / "d.json", [row, row, None, row])
    with pytest.raises(DatasetError, match=r"d.json: row 3: a JSON null, not an object; fix"):
        _read(ctx, path)
    with pytest.raises(DatasetError, match=r"d.json: row 2: a JSON array, not an object"):
        _read(ctx, _array(tmp_path / "d.json", [row, [1, 2]]))


def test_a_json_arrays_element_that_is_no_object_is_skipped_when_asked(ctx, tmp_path):
    row = {"term": "acute", "definition": "sudden"}
    path = _array(tmp_path / "d.json", [row, None, "text", row])
    rows, opened = _read(ctx, path, skip_bad_rows=True)
    assert rows == [("acute", "sudden")] * 2 and opened.bad_rows == 2


def test_bad_bytes_after_a_bom_are_named_at_their_byte_offset(ctx, tmp_path):
    data = b'\xef\xbb\xbf{"term": "caf\xe9", "definition": "x"}\n'
    path = _write(tmp_path / "d.jsonl", data)
    offset = data.index(b"\xe9")  # 16: the BOM's 3 bytes count
    with pytest.raises(DatasetError, match=rf"line 1: .* at byte offset {offset}$"):
        _read(ctx, path)
