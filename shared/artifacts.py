"""Reading stage artifacts back: dataset splits and adapter folders, checked on the way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.errors import DatasetError, ModelError, NotFound
from shared.store import Store


def read_split(
    store: Store,
    manifest: dict[str, Any],
    split: str,
    *,
    cache_dir: Path,
    max_rows: int | None = None,
) -> pa.Table:
    """One split of a prepared dataset, its shards' SHA-256 verified."""
    if split not in manifest.get("shards", {}):
        raise DatasetError(f"the prepared dataset has no {split!r} split")
    tables = []
    for shard in manifest["shards"][split]:
        key = store.key_of(shard["uri"])
        path = cache_dir / "artifacts" / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.download_file(key, path)
            except NotFound as exc:
                raise DatasetError(f"dataset shard missing: {shard['uri']}") from exc
        if hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
            path.unlink()
            raise DatasetError(f"dataset shard {shard['uri']} does not match its SHA-256")
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    return table.slice(0, max_rows) if max_rows is not None else table


def adapter_dir(store: Store, training_manifest: dict[str, Any], *, cache_dir: Path) -> Path:
    """A local folder holding the trained LoRA adapter."""
    try:
        return store.local_dir(store.key_of(training_manifest["adapter"]), cache_dir / "artifacts")
    except (KeyError, NotFound) as exc:
        raise ModelError(f"the trained adapter is missing: {exc}") from exc


def dropped_rows(cleaning: dict[str, int]) -> dict[str, int]:
    """Rows a data-prep manifest's cleaning dropped, by rule (``dropped_duplicate`` →
    duplicate)."""
    return {k.removeprefix("dropped_"): v for k, v in cleaning.items() if k.startswith("dropped_")}
