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
from shared.worker import StageContext

SHARD_ROWS = 50_000


def handle(command: PrepareDataset, ctx: StageContext) -> DatasetPrepared:
    """Prepare the dataset once; a stored manifest makes a redelivery a no-op."""
    done = ctx.jobs.manifest(command.job_id, "prepare")
    if done is not None:
        return _event(command, ctx, done)
    spec = ctx.spec(command)
    table = sources.read_source(spec.dataset, store=ctx.store, cache_dir=ctx.settings.cache_dir)
    examples = prepare.render(table, spec.dataset, shown=spec.dataset.source)
    ctx.progress({"rows": len(examples.prompts), "phase": "tokenizing"}, force=True)
    tokenizer = load_tokenizer(spec.base_model)
    tokens = prepare.tokenize(tokenizer, examples.prompts, examples.targets, spec=spec.dataset)
    splits = prepare.split(
        examples,
        test_size=spec.dataset.test_size,
        validation_size=spec.dataset.validation_size,
        seed=spec.dataset.seed,
    )
    prefix = ctx.jobs.stage_prefix(command.job_id, "prepare")
    folder = ctx.scratch(command, "prepare")
    manifest: dict[str, Any] = {
        "source": spec.dataset.source,
        "rows_read": table.num_rows,
        "dropped": examples.dropped,
        "counts": {},
        "shards": {},
        "tokens": {},
        "template": {
            "prompt": spec.dataset.prompt_template,
            "target": spec.dataset.target_template,
        },
        "tokenizer": {
            "name": spec.base_model,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
        },
        "split": {
            "test_size": spec.dataset.test_size,
            "seed": spec.dataset.seed,
            "grouped_by": "prompt",
            "shared_prompts": _shared(examples, splits),
        },
        "versions": versions(),
    }
    for name, indices in splits.items():
        columns = {
            "prompt": [examples.prompts[i] for i in indices],
            "target": [examples.targets[i] for i in indices],
            "input_ids": [tokens["input_ids"][i] for i in indices],
            "labels": [tokens["labels"][i] for i in indices],
        }
        manifest["counts"][name] = len(indices)
        manifest["shards"][name] = _write_shards(ctx, columns, folder, prefix, name)
        manifest["tokens"][name] = {
            "source": prepare.length_stats(
                [len(x) for x in columns["input_ids"]], spec.dataset.max_source_length
            ),
            "target": prepare.length_stats(
                [len(x) for x in columns["labels"]], spec.dataset.max_target_length
            ),
        }
    ctx.jobs.write_manifest(command.job_id, "prepare", manifest)
    return _event(command, ctx, manifest)


def _write_shards(
    ctx: StageContext, columns: dict[str, list[Any]], folder: Path, prefix: str, name: str
) -> list[dict[str, Any]]:
    table = pa.table(
        columns,
        schema=pa.schema(
            [
                ("prompt", pa.string()),
                ("target", pa.string()),
                ("input_ids", pa.list_(pa.int32())),
                ("labels", pa.list_(pa.int32())),
            ]
        ),
    )
    shards = []
    for n, start in enumerate(range(0, max(table.num_rows, 1), SHARD_ROWS)):
        path = folder / f"{name}-{n:05d}.parquet"
        pq.write_table(table.slice(start, SHARD_ROWS), path)
        key = f"{prefix}/{path.name}"
        ctx.store.upload_file(path, key)
        shards.append(
            {
                "uri": ctx.store.uri(key),
                "rows": min(SHARD_ROWS, table.num_rows - start),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    return shards


def _shared(examples: prepare.Examples, splits: dict[str, list[int]]) -> int:
    """Rows of the held-out splits whose prompt also appears in train (the leakage check)."""
    train = {examples.prompts[i].casefold() for i in splits["train"]}
    held_out = [i for name, rows in splits.items() if name != "train" for i in rows]
    return sum(examples.prompts[i].casefold() in train for i in held_out)


def _event(command: PrepareDataset, ctx: StageContext, manifest: dict[str, Any]) -> DatasetPrepared:
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "prepare"))
    return DatasetPrepared(job_id=command.job_id, manifest=uri, counts=manifest["counts"])
