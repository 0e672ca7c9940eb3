"""Reading a dataset source into an Arrow table: local files, store URIs, hub ids."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from shared.errors import DatasetError, NotFound
from shared.jobspec import DatasetSpec
from shared.store import Store

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_source(spec: DatasetSpec, *, store: Store, cache_dir: Path) -> pa.Table:
    """The rows of the spec's dataset source as an Arrow table."""
    source = spec.source
    if source.startswith("s3://") or source.startswith(store.root_uri + "/"):
        key = store.key_of(source)
        path = cache_dir / "sources" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download_file(key, path)
        except NotFound as exc:
            raise DatasetError(f"dataset.source: {source} does not exist") from exc
        return read_file(path, shown=source)
    if source.startswith("file://"):
        return read_file(Path(unquote(urlparse(source).path)), shown=source)
    if source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/")):
        return read_file(Path(source), shown=source)
    return read_hub(spec)


def read_file(path: Path, *, shown: str) -> pa.Table:
    """Read a JSONL, JSON, CSV, TSV or Parquet file; DatasetError naming the file."""
    if not path.is_file():
        raise DatasetError(
            f"dataset.source: file not found: {shown} (resolved to {path.resolve()})"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) != "["):
            table = pajson.read_json(path)
        elif suffix == ".json":
            table = pa.Table.from_pylist(json.loads(path.read_text(encoding="utf-8")))
        elif suffix in (".csv", ".tsv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        elif suffix == ".parquet":
            table = pq.read_table(path)
        else:
            raise DatasetError(
                f"dataset.source: {shown}: unsupported file type {suffix!r}; "
                f"use one of {', '.join(FILE_SUFFIXES)}"
            )
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset.source: cannot read {shown}: {exc}") from exc
    if table.num_rows == 0:
        raise DatasetError(f"dataset.source: {shown} holds no rows")
    return table


def _first_char(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(64).lstrip()[:1].decode("ascii", errors="replace")


def read_hub(spec: DatasetSpec) -> pa.Table:
    """Load a Hugging Face hub dataset split (``datasets.load_dataset``)."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, split=spec.split, revision=spec.revision)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types
        raise DatasetError(
            f"dataset.source: cannot load hub dataset {spec.source!r} (split {spec.split!r}): "
            f"{exc}. If the hub is unreachable, point dataset.source at a local file "
            "(.jsonl, .csv, .parquet) instead"
        ) from exc
    return ds.data.table
