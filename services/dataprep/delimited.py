"""CSV and TSV files: pyarrow's reading options for each, the check that a .tsv read with
CSV quoting ("auto") merged no rows, and the line of a row pyarrow could not parse (its
errors name none)."""

from __future__ import annotations

import csv
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from shared.errors import DatasetError

#: the largest cell Python's csv module reads when a CSV/TSV error is located
CSV_FIELD_LIMIT = 1 << 28


def delimited_batches(
    path: Path, *, inferred: Collection[str], quoting: str
) -> Iterator[pa.RecordBatch]:
    """Record batches of a CSV or TSV file (see ``sources._arrow_batches``)."""
    parse = _parse_options(path, quoting)
    read = pacsv.ReadOptions(block_size=1 << 22)
    with pacsv.open_csv(path, parse_options=parse, read_options=read) as header:
        names = header.schema.names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # one would silently stand for the other
        raise DatasetError(f"{path}: columns named twice in its header: {', '.join(twice)}")
    as_written = {name: pa.string() for name in names if name not in inferred}
    convert = pacsv.ConvertOptions(column_types=as_written)
    checked = path.suffix.lower() == ".tsv" and quoting == "auto"
    with pacsv.open_csv(
        path, parse_options=parse, read_options=read, convert_options=convert
    ) as reader:
        for batch in reader:
            if checked and _spans_lines(batch):
                raise DatasetError(f"{path}: {_spanning_row(path)}")
            yield batch


def _parse_options(path: Path, quoting: str) -> pacsv.ParseOptions:
    if path.suffix.lower() != ".tsv":
        return pacsv.ParseOptions(delimiter=",", newlines_in_values=True)
    if quoting == "none":  # plain TSV: no cell holds a tab or a line break
        return pacsv.ParseOptions(delimiter="\t", quote_char=False)
    return pacsv.ParseOptions(delimiter="\t", newlines_in_values=True)


def _csv_dialect(path: Path, quoting: str) -> dict[str, Any]:
    """Python's csv module reading a file as ``_parse_options`` has pyarrow read it."""
    if path.suffix.lower() != ".tsv":
        return {"delimiter": ","}
    if quoting == "none":
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": "\t"}


def _records(path: Path, quoting: str) -> Iterator[tuple[int, list[str]]]:
    """Each non-empty record of a CSV/TSV file with the line it starts on. Used to locate an
    error pyarrow reports without a line; a cell over CSV_FIELD_LIMIT ends the scan with
    that record as the last one (an empty list)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh, **_csv_dialect(path, quoting))
        start = 1
        try:
            for record in reader:
                if record:  # pyarrow skips empty lines
                    yield start, record
                start = reader.line_num + 1
        except csv.Error:
            yield start, []


def _spans_lines(batch: pa.RecordBatch) -> bool:
    """Whether a text cell holds a line break or a tab (only quoting can put them there)."""
    return any(
        pa.types.is_string(column.type)
        and pc.any(pc.match_substring_regex(column, "[\t\r\n]")).as_py()
        for column in batch.columns
    )


def _spanning_row(path: Path) -> str:
    """Where a .tsv file read with "auto" quoting has a quoted cell spanning lines or
    holding a tab, and what to do about it."""
    found = next(
        (line for line, record in _records(path, "csv") if any(_spanning(c) for c in record)),
        None,
    )
    where = f"line {found}: " if found is not None else ""
    return (
        f"{where}a quoted cell spans lines or holds a tab; in a plain TSV a stray quote "
        "merges the rows that follow it. Set dataset.tsv_quoting: none if the file is plain "
        "TSV (a quote is text), or csv if its cells are quoted as CSV quotes them (pandas' "
        'to_csv with sep="\\t")'
    )


def _spanning(cell: str) -> bool:
    return any(c in cell for c in "\t\r\n")


#: pyarrow's error for a row with too many or too few fields
_RAGGED = re.compile(r"Expected \d+ columns?, got \d+")


def ragged_row(path: Path, *, quoting: str, error: Exception) -> str | None:
    """The line of the first CSV/TSV row whose number of fields differs from the header's,
    when pyarrow's ``error`` says there is one (pyarrow names no line)."""
    if not _RAGGED.search(str(error)):
        return None
    records = _records(path, quoting)
    _, header = next(records, (1, []))
    for line, record in records:
        if len(record) != len(header):
            found = "a cell too large to read" if not record else f"{len(record)}"
            hint = ""
            if path.suffix.lower() == ".tsv" and quoting != "none":
                hint = (
                    "; in a plain TSV a stray quote merges the rows that follow it: set "
                    "dataset.tsv_quoting: none if a quote is text"
                )
            return f"line {line}: expected {len(header)} fields, found {found}{hint}"
    return None
