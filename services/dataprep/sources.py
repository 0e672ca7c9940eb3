"""Dataset sources read as a stream of row batches: local files and globs, S3, hub ids.

Every error names the source, and where it can the file, the line or byte offset and the
column. Nothing here holds more than one batch of rows in memory (a JSON array file is the
exception: prefer JSONL for large data).

Template columns must hold text (or nothing): a number, boolean or any other type fails
naming the file, the column and the type, unless ``dataset.cast_to_string`` asks for that
column's numbers and booleans as text. Rows of a JSON array are counted from 1, like lines.

A .tsv file is read as ``dataset.tsv_quoting`` says: with CSV quoting ("csv"), with none
("none": a quote is text), or with CSV quoting refused where a quoted cell spans lines or
holds a tab ("auto": in a plain TSV, a stray quote merged the rows that follow it).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.dataprep.delimited import delimited_batches, ragged_row
from shared.errors import DatasetError, NotFound
from shared.jobspec import DatasetSpec
from shared.locations import GLOB_CHARS, check_local, check_source
from shared.settings import Settings
from shared.store import Store, s3_client

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
BATCH_ROWS = 2048
TEXT_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_string_view,  # Polars' default string type
    pa.types.is_null,
)
CASTABLE_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
JSON_KINDS = {
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}

Batch = dict[str, list[Any]]


@dataclass
class Source:
    """A dataset opened for reading: its files, its columns, and its row batches."""

    shown: str
    files: list[Path] = field(default_factory=list)
    columns: dict[str, pa.DataType] = field(default_factory=dict)  # from the first file
    skip_bad_rows: bool = False
    bad_rows: int = 0
    hub: DatasetSpec | None = None
    needed: list[str] = field(default_factory=list)  # the template columns
    cast: frozenset[str] = frozenset()  # template columns whose numbers become text
    tsv_quoting: str = "auto"  # dataset.tsv_quoting

    def batches(self) -> Iterator[Batch]:
        """Row batches of every file (or of the hub dataset), in order."""
        if self.hub is not None:
            yield from self._hub(self.hub)
            return
        for path in self.files:
            for n, batch in enumerate(self._file_batches(path)):
                if n == 0 and path != self.files[0]:  # the first file's: before any work
                    self._check_columns(path, batch)
                yield batch

    def _check_columns(self, path: Path, batch: Batch) -> None:
        """A glob's later file without a template column would have its rows dropped as
        empty, one by one: refused, naming the file."""
        missing = [name for name in self.needed if name not in batch]
        if missing:
            raise DatasetError(
                f"{path}: no column {', '.join(map(repr, missing))} (columns found: "
                f"{', '.join(batch)}); every file {self.shown} matches needs the template's"
            )

    def _file_batches(self, path: Path) -> Iterator[Batch]:
        suffix = path.suffix.lower()
        if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) != "["):
            yield from self._jsonl(path)
        elif suffix == ".json":
            rows = _json_array(path)
            for start in range(0, len(rows), BATCH_ROWS):
                chunk = enumerate(rows[start : start + BATCH_ROWS], start + 1)
                kept = [r for n, r in chunk if self._array_row(r, where=f"{path}: row {n}")]
                if kept:
                    yield _columns(kept)
        else:
            inferred = [name for name in self.needed if name not in self.cast]
            for batch in _arrow_batches(path, inferred=inferred, quoting=self.tsv_quoting):
                yield self._arrow_typed(path, batch).to_pydict()

    def _arrow_typed(self, path: Path | str, batch: pa.RecordBatch | pa.Table) -> Any:
        """The batch with cast columns as text; DatasetError for a column of another type."""
        inferred = str(path).lower().endswith((".csv", ".tsv"))
        types = {f.name: f.type for f in batch.schema}
        check_arrow_types(path, types, self.needed, cast=self.cast, inferred=inferred)
        for name in self.needed:
            kind = types.get(name)
            # cast asked for by the spec, or text the rest of data-prep reads as plain strings
            if kind is not None and (not _is_text(kind) or pa.types.is_string_view(kind)):
                index = batch.schema.get_field_index(name)
                batch = batch.set_column(index, name, pc.cast(batch.column(index), pa.string()))
        return batch

    def _array_row(self, row: Any, *, where: str) -> bool:
        """Whether a JSON array's element is a row to keep: an object whose template values
        are text; False for one to skip, DatasetError for one that fails the job."""
        if isinstance(row, dict):
            return self._typed(row, where=where)
        if self.skip_bad_rows:
            self.bad_rows += 1
            return False
        raise DatasetError(
            f"{where}: a JSON {_json_kind(row)}, not an object; fix the row or set "
            "dataset.skip_bad_rows: true"
        )

    def _typed(self, row: dict[str, Any], *, where: str) -> bool:
        """Whether a JSON row's template values are text (cast in place when asked); False
        for a row to skip, DatasetError for one that fails the job."""
        for name in self.needed:
            value = row.get(name)
            if value is None or (isinstance(value, str) and _encodes(value)):
                continue
            if isinstance(value, str):  # JSON's "\\ud800" escape: no character at all
                if self.skip_bad_rows:
                    self.bad_rows += 1
                    return False
                raise DatasetError(
                    f"{where}: column {name!r} holds a lone UTF-16 surrogate (an escape such as "
                    "\\ud800 without its pair), not text; fix the data or set "
                    "dataset.skip_bad_rows: true to skip such rows"
                )
            kind = _json_kind(value)
            if name in self.cast and kind in ("number", "boolean"):
                row[name] = json.dumps(value)
                continue
            if self.skip_bad_rows:
                self.bad_rows += 1
                return False
            shown = f"a JSON {kind}" + (f" ({json.dumps(value)})" if kind == "number" else "")
            problem = wrong_type(name, shown, castable=kind in ("number", "boolean"))
            raise DatasetError(
                f"{where}: {problem}, or set dataset.skip_bad_rows: true to skip such rows"
            )
        return True

    def _hub(self, spec: DatasetSpec) -> Iterator[Batch]:
        for table in _hub_batches(spec):
            yield self._arrow_typed(self.shown, table).to_pydict()

    def _jsonl(self, path: Path) -> Iterator[Batch]:
        rows: list[dict[str, Any]] = []
        offset = 0
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                row = self._jsonl_row(path, raw, line_no=line_no, offset=offset)
                offset += len(raw)
                if row is not None:
                    rows.append(row)
                if len(rows) >= BATCH_ROWS:
                    yield _columns(rows)
                    rows = []
        if rows:
            yield _columns(rows)

    def _jsonl_row(
        self, path: Path, raw: bytes, *, line_no: int, offset: int
    ) -> dict[str, Any] | None:
        # a BOM that editors on Windows write opens the first line
        bom = len(codecs.BOM_UTF8) if line_no == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{path}: line {line_no}: bytes that are not UTF-8 at byte offset "
                f"{offset + bom + exc.start}"
            ) from exc
        if not text.strip():
            return None
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {_json_kind(row)}, not an object")
        except ValueError as exc:
            if self.skip_bad_rows:
                self.bad_rows += 1
                return None
            raise DatasetError(
                f"{path}: line {line_no}: not a JSON object ({exc}); fix the line "
                "or set dataset.skip_bad_rows: true"
            ) from exc
        return row if self._typed(row, where=f"{path}: line {line_no}") else None


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words."""
    return JSON_KINDS.get(type(value), type(value).__name__)


def _encodes(text: str) -> bool:
    """Whether a string is text UTF-8 can write (JSON may decode to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in TEXT_TYPES)


def wrong_type(name: str, kind: str, *, castable: bool) -> str:
    """What is wrong with a template column that does not hold text, and what would fix it."""
    if castable:
        fix = (
            f"fix the data or set dataset.cast_to_string: true (or [{name}]) to write its "
            "values as text"
        )
    else:
        fix = "cast_to_string converts numbers and booleans only; fix the data"
    return f"column {name!r} is {kind}, not text; {fix}"


def check_arrow_types(
    path: Path | str,
    types: dict[str, pa.DataType],
    needed: list[str],
    *,
    cast: frozenset[str],
    inferred: bool = False,
) -> None:
    """Refuse template columns of a typed file (Parquet, CSV) that do not hold text, naming
    every such column."""
    problems = []
    for name in needed:
        kind = types.get(name)
        if kind is None or _is_text(kind):
            continue
        # a CSV's cast column is read as written, whatever type its values suggest
        castable = inferred or any(check(kind) for check in CASTABLE_TYPES)
        if castable and name in cast:
            continue
        shown = f"{kind} (inferred from its values)" if inferred else str(kind)
        problems.append(wrong_type(name, shown, castable=castable))
    if problems:
        raise DatasetError(f"{path}: " + "; ".join(problems))


def _columns(rows: list[dict[str, Any]]) -> Batch:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def _first_char(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(64).removeprefix(codecs.BOM_UTF8).lstrip()[:1].decode("ascii", "replace")


def _json_array(path: Path) -> list[Any]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: bytes that are not UTF-8 at byte offset {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(rows, list):  # its elements are checked as rows
        raise DatasetError(f"{path}: a .json dataset must be an array of objects")
    return rows


def _arrow_batches(
    path: Path, *, inferred: Collection[str] = (), quoting: str = "auto"
) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet or CSV file. A CSV's ``inferred`` columns (the template
    columns not cast to text) get the type their values show, checked as text by the
    caller; every other column is read as written: pyarrow infers a type from the first
    block alone, so an unused column empty or numeric for 4 MiB and text later failed the
    file. Quoted values may hold line breaks, however large the file (pyarrow splits blocks
    at line breaks unless told). ``quoting``: dataset.tsv_quoting, for a .tsv file."""
    try:
        if path.suffix.lower() == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            return
        yield from delimited_batches(path, inferred=inferred, quoting=quoting)
    except (pa.ArrowInvalid, OSError) as exc:
        parquet = path.suffix.lower() == ".parquet"
        if not parquet and not isinstance(exc, pa.ArrowInvalid):
            raise  # a disk's error, not the file's: the stage is tried again
        bad = None if parquet else first_invalid_utf8(path)  # a corrupt page is an OSError
        if bad is not None:
            raise DatasetError(f"{path}: bytes that are not UTF-8 at byte offset {bad}") from exc
        ragged = None if parquet else ragged_row(path, quoting=quoting, error=exc)
        if ragged is not None:
            raise DatasetError(f"{path}: {ragged}") from exc
        raise DatasetError(f"{path}: cannot read: {_without_content(exc)}") from exc


def first_invalid_utf8(path: Path) -> int | None:
    """The byte offset of the first invalid UTF-8 sequence in a file, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return offset + exc.start - len(decoder.getstate()[0])
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset - len(decoder.getstate()[0])
    return None


def _schema(
    path: Path, *, inferred: Collection[str], quoting: str = "auto"
) -> dict[str, pa.DataType]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return {f.name: f.type for f in pq.read_schema(path)}
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from exc
    if suffix in (".csv", ".tsv"):
        for batch in _arrow_batches(path, inferred=inferred, quoting=quoting):
            types = {f.name: f.type for f in batch.schema}
            if any(pa.types.is_binary(t) for t in types.values()):  # pyarrow's non-UTF-8 text
                bad = first_invalid_utf8(path)
                if bad is not None:
                    raise DatasetError(f"{path}: bytes that are not UTF-8 at byte offset {bad}")
            return types
    if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) != "["):
        return _jsonl_columns(path)
    return {}  # a JSON array: columns are known once it is read


def _jsonl_columns(path: Path) -> dict[str, pa.DataType]:
    """Columns of the first batch's JSONL rows, as the first batch read will have them
    (checked before any work): an exporter that leaves out null keys may leave a column
    out of the first row alone."""
    columns: dict[str, pa.DataType] = {}
    with path.open("rb") as fh:
        for raw in itertools.islice(fh, BATCH_ROWS):
            try:
                row = json.loads(raw) if raw.strip() else None
            except ValueError:
                continue  # reported with its line number when rows are read
            if isinstance(row, dict):
                columns |= dict.fromkeys(row, pa.string())
    return columns


def check_types(source: Source) -> None:
    """Refuse the first file's template columns that do not hold text (Parquet, CSV), before
    any work; every file's are checked again as it is read."""
    path = source.files[0]
    inferred = path.suffix.lower() in (".csv", ".tsv")
    if path.suffix.lower() in (".parquet", ".csv", ".tsv"):
        check_arrow_types(path, source.columns, source.needed, cast=source.cast, inferred=inferred)


def open_source(spec: DatasetSpec, *, store: Store, settings: Settings) -> Source:
    """Resolve the spec's source to files (or the hub) and read their columns."""
    source = spec.source
    kind = check_source(source, store_root=store.root_uri, settings=settings)
    if kind == "store":
        files = [_store_file(source, store=store, settings=settings)]
    elif kind == "s3":
        files = [_s3_file(source, store=store, settings=settings)]
    elif kind == "local":
        path = unquote(urlparse(source).path) if source.startswith("file://") else source
        files = _local_files(path, shown=source)
        for file in files:  # a glob's matches, and links among them, stay inside too
            check_local(source, str(file), settings=settings)
    else:
        files = []
    needed = spec.template_columns
    opened = Source(
        shown=source,
        files=files,
        skip_bad_rows=spec.skip_bad_rows,
        hub=spec if kind == "hub" else None,
        needed=needed,
        cast=frozenset(name for name in needed if spec.casts(name)),
        tsv_quoting=spec.tsv_quoting,
    )
    if files:
        opened.columns = _schema(
            files[0],
            inferred=[name for name in needed if name not in opened.cast],
            quoting=spec.tsv_quoting,
        )
    return opened


def _local_files(pattern: str, *, shown: str) -> list[Path]:
    """The files a local source names: an existing path as it is (``glossary[v2].jsonl``),
    otherwise a glob's matches."""
    if any(c in pattern for c in GLOB_CHARS) and not os.path.lexists(pattern):
        files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DatasetError(f"dataset.source: no file matches {shown}")
    else:
        files = [Path(pattern)]
    for path in files:
        if not path.is_file():
            raise DatasetError(
                f"dataset.source: file not found: {shown} (resolved to {path.resolve()})"
            )
        _check_file(path, shown=str(path))
    return files


def _check_file(path: Path, *, shown: str) -> None:
    """A file of a type data-prep reads, and not empty (``shown``: as the user named it)."""
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DatasetError(
            f"dataset.source: {shown}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset.source: {shown} is empty")


def _fetched(path: Path, download: Callable[[Path], None], *, shown: str) -> Path:
    """``download`` into a temporary name beside ``path``, then renamed: two jobs fetching
    one source on a host each read a whole copy, never one the other is rewriting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        download(part)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    _check_file(path, shown=shown)
    return path


def _store_file(uri: str, *, store: Store, settings: Settings) -> Path:
    key = store.key_of(uri)
    try:
        return _fetched(
            settings.cache_dir / "sources" / key,
            lambda part: store.download_file(key, part),
            shown=uri,
        )
    except NotFound as exc:
        raise DatasetError(f"dataset.source: {uri} does not exist") from exc


def _s3_file(uri: str, *, store: Store, settings: Settings) -> Path:
    parsed = urlparse(uri)  # check_source allowed the bucket and the key
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    from botocore.exceptions import ClientError

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    client = s3_client(settings)
    try:
        return _fetched(
            settings.cache_dir / "sources" / digest / Path(key).name,
            lambda part: client.download_file(bucket, key, str(part)),
            shown=uri,
        )
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise DatasetError(
                f"dataset.source: no object {uri} (an s3:// source names one object, its "
                "key as written)"
            ) from exc
        raise DatasetError(f"dataset.source: cannot read {uri}: {exc}") from exc


def _hub_batches(spec: DatasetSpec) -> Iterator[pa.Table]:
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.source, name=spec.subset, split=spec.split, revision=spec.revision
        )
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types
        raise DatasetError(
            f"dataset.source: cannot load hub dataset {spec.source!r} (split {spec.split!r}): "
            f"{exc}. If the hub is unreachable, point dataset.source at a local file "
            "(.jsonl, .csv, .parquet) instead"
        ) from exc
    yield from ds.with_format("arrow").iter(batch_size=BATCH_ROWS)


def file_digests(source: Source) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of each input file (the dataset's identity)."""
    out = []
    for path in source.files:
        sha = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
        out.append({"file": str(path), "bytes": path.stat().st_size, "sha256": sha.hexdigest()})
    return out


#: pyarrow's CSV errors end with the offending row ("Expected 1 columns, got 7: <row>")
_QUOTED_ROW = re.compile(r"^(.*?columns?, got \d+)")


def _without_content(exc: Exception) -> str:
    """A reader's error without the file's own text: the message names the problem and where
    (the job's error is shown to every user of the API; the file may be anything a link
    points at)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    match = _QUOTED_ROW.match(first)
    return match.group(1) if match else first[:200]
