"""Data-prep: the job's dataset → tokenized train/test Parquet shards and a manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from services.dataprep import prepare, sources
from shared.messages import DatasetPrepared, PrepareDataset
from shared.modeling import load_tokenizer, versions
from shared.store import Store
from shared.worker import StageContext

SHARD_ROWS = 50_000
SPLITS = ("train", "validation", "test")


def handle(command: PrepareDataset, ctx: StageContext) -> DatasetPrepared:
    """Prepare the dataset once; a stored manifest makes a redelivery a no-op."""
    done = ctx.jobs.manifest(command.job_id, "prepare")
    if done is None:
        done = _prepare(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "prepare"))
    return DatasetPrepared(job_id=command.job_id, manifest=uri, counts=done["counts"])


def _prepare(command: PrepareDataset, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    data = spec.dataset
    source = sources.open_source(data, store=ctx.store, settings=ctx.settings)
    if source.columns:
        needed = prepare.check_columns(list(source.columns), data, shown=source.shown)
        sources.check_types(source, needed)
    tokenizer = load_tokenizer(spec.base_model)
    folder = ctx.scratch(command, "prepare")
    staged = prepare.stage(
        source.batches(),
        data,
        tokenizer,
        path=folder / "staged.parquet",
        shown=source.shown,
        progress=ctx.progress,
    )
    keys = pq.read_table(staged.path, columns=["key"]).column("key").to_pylist()
    assignment = prepare.assign_splits(
        keys, test_size=data.test_size, validation_size=data.validation_size, seed=data.seed
    )
    ctx.progress({"phase": "writing shards", "rows": staged.rows_kept}, force=True)
    writer = _ShardWriter(ctx.store, folder, ctx.jobs.stage_prefix(command.job_id, "prepare"))
    _route(staged.path, assignment, writer)
    shards, lengths = writer.close()
    staged.path.unlink()
    manifest = {
        "source": data.source,
        "inputs": sources.file_digests(source),
        "rows_read": staged.rows_read,
        "bad_rows_skipped": source.bad_rows,
        "cleaning": dict(sorted(staged.cleaning.items())),
        "counts": {s: sum(x["rows"] for x in shards[s]) for s in SPLITS if shards.get(s)},
        "shards": shards,
        "tokens": {
            s: {
                "source": prepare.length_stats(lengths[s][0], data.max_source_length),
                "target": prepare.length_stats(lengths[s][1], data.max_target_length),
            }
            for s in shards
        },
        "template": {"prompt": data.prompt_template, "target": data.target_template},
        "tokenizer": {
            "name": spec.base_model,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
        },
        "split": {
            "test_size": data.test_size,
            "validation_size": data.validation_size,
            "seed": data.seed,
            "grouped_by": "prompt (case-insensitive)",
            "distinct_prompts": len(assignment),
            "shared_prompts": writer.shared_keys(),
        },
        "versions": versions(),
    }
    ctx.jobs.write_manifest(command.job_id, "prepare", manifest)
    return manifest


def _route(staged: Path, assignment: dict[bytes, str], writer: _ShardWriter) -> None:
    """Send each staged row to the shards of its prompt's split."""
    for batch in pq.ParquetFile(staged).iter_batches(batch_size=sources.BATCH_ROWS):
        keys = batch.column("key").to_pylist()
        names = [assignment[k] for k in keys]
        table = pa.Table.from_batches([batch]).drop(["key"])
        for split in SPLITS:
            chosen = [n == split for n in names]
            writer.add(
                split,
                table.filter(pa.array(chosen)),
                keys=[k for k, c in zip(keys, chosen, strict=True) if c],
            )


class _ShardWriter:
    """Writes each split's rows into numbered Parquet shards and uploads them."""

    def __init__(self, store: Store, folder: Path, prefix: str) -> None:
        self.store, self.folder, self.prefix = store, folder, prefix
        self.pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.lengths: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in SPLITS}
        self.keys: dict[str, set[bytes]] = {s: set() for s in SPLITS}

    def add(self, split: str, table: pa.Table, *, keys: list[bytes]) -> None:
        if table.num_rows == 0:
            return
        self.keys[split].update(keys)
        self.pending[split].append(table)
        self.lengths[split][0].extend(len(x) for x in table.column("input_ids").to_pylist())
        self.lengths[split][1].extend(len(x) for x in table.column("labels").to_pylist())
        if sum(t.num_rows for t in self.pending[split]) >= SHARD_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        table = pa.concat_tables(self.pending[split]).cast(prepare.SHARD_SCHEMA)
        self.pending[split] = []
        path = self.folder / f"{split}-{len(self.shards[split]):05d}.parquet"
        pq.write_table(table, path)
        key = f"{self.prefix}/{path.name}"
        self.store.upload_file(path, key)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.shards[split].append(
            {"uri": self.store.uri(key), "rows": table.num_rows, "sha256": digest}
        )
        path.unlink()

    def shared_keys(self) -> int:
        """Prompt groups written to more than one split (the leakage check: 0 expected)."""
        return sum(
            len(self.keys[a] & self.keys[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]
        )

    def close(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, tuple]]:
        for split in SPLITS:
            if self.pending[split]:
                self._flush(split)
        kept = {s: v for s, v in self.shards.items() if v}
        return kept, {s: self.lengths[s] for s in kept}
