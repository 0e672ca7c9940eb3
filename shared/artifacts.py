"""Reading stage artifacts back: dataset splits and adapter folders, checked on the way."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.errors import CorruptOutput, DatasetError, NotFound
from shared.modeling import unreadable_weights
from shared.store import Store


def read_split(
    store: Store,
    manifest: dict[str, Any],
    split: str,
    *,
    cache_dir: Path,
    max_rows: int | None = None,
    seed: int = 0,
) -> pa.Table:
    """One split of a prepared dataset, its shards' SHA-256 verified: a cached copy that does
    not match is fetched again; a stored one that does not (or a shard gone) is the prepare
    stage's corrupt output (``CorruptOutput``: that stage runs again). ``max_rows`` keeps a
    uniform sample of at most that many rows, seeded by ``seed``, in the split's order: of
    whole prompts, each with all its rows, where the split has a ``prompt`` column (a term's
    answers share the model's one answer; the gate resamples prompts)."""
    if split not in manifest.get("shards", {}):
        raise DatasetError(f"the prepared dataset has no {split!r} split")
    tables = []
    for shard in manifest["shards"][split]:
        key = store.key_of(shard["uri"])
        path = cache_dir / "artifacts" / key
        for fetched in (False, True):
            if fetched or not path.exists():
                _fetch(store, key, path)
            if sha256_of(path) == shard["sha256"]:
                break
            path.unlink()
        else:
            raise CorruptOutput(
                f"dataset shard {shard['uri']} does not match its SHA-256", stage="prepare"
            )
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    if max_rows is None or table.num_rows <= max_rows:
        return table
    # a split keeps its source's order (sorted by domain, say): its head is no sample
    if "prompt" not in table.column_names:
        return table.take(sorted(random.Random(seed).sample(range(table.num_rows), max_rows)))
    return table.take(sorted(_whole_prompts(table.column("prompt").to_pylist(), max_rows, seed)))


def _whole_prompts(prompts: list[str], max_rows: int, seed: int) -> list[int]:
    """The rows of prompts drawn in a seeded order, each prompt whole, while they fit in
    ``max_rows`` (one that would not is passed over for smaller ones)."""
    rows: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows.setdefault(prompt.casefold(), []).append(row)
    groups = list(rows.values())
    kept: list[int] = []
    for index in random.Random(seed).sample(range(len(groups)), len(groups)):
        if len(kept) + len(groups[index]) <= max_rows:
            kept += groups[index]
    return kept


def _fetch(store: Store, key: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.download_file(key, path)
    except NotFound as exc:
        raise CorruptOutput(f"dataset shard missing: {store.uri(key)}", stage="prepare") from exc


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by its path relative to it."""
    return {
        path.relative_to(folder).as_posix(): sha256_of(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def adapter_dir(store: Store, training_manifest: dict[str, Any], *, cache_dir: Path) -> Path:
    """A local folder holding the trained LoRA adapter, checked against the SHA-256s the
    training manifest lists (a cached copy that does not match is fetched again). A stored
    adapter that is gone, cut short or does not match is the train stage's corrupt output
    (``CorruptOutput``: that stage runs again, from its checkpoints)."""
    prefix = store.key_of(training_manifest["adapter"])
    for fetched in (False, True):
        try:
            folder = store.local_dir(prefix, cache_dir / "artifacts")
        except NotFound as exc:
            raise CorruptOutput(f"the trained adapter is missing: {exc}", stage="train") from exc
        problem = _adapter_problem(folder, training_manifest.get("adapter_sha256"))
        if problem is None:
            return folder
        cached = cache_dir / "artifacts" / prefix
        if fetched or folder != cached:
            break  # the store's own copy
        shutil.rmtree(cached, ignore_errors=True)
    raise CorruptOutput(
        f"the trained adapter {training_manifest['adapter']}: {problem}", stage="train"
    )


def _adapter_problem(folder: Path, digests: dict[str, str] | None) -> str | None:
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return "has no adapter_model.safetensors"
    if digests is None:  # a manifest from before termtune listed them
        return unreadable_weights(weights)
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file() or sha256_of(path) != digest:
            return f"{name} does not match its SHA-256"
    return None


def dropped_rows(cleaning: dict[str, int]) -> dict[str, int]:
    """Rows a data-prep manifest's cleaning dropped, by rule (``dropped_duplicate`` →
    duplicate)."""
    return {k.removeprefix("dropped_"): v for k, v in cleaning.items() if k.startswith("dropped_")}
