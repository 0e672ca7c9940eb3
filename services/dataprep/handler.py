"""Data-prep: the job's dataset → tokenized train/test Parquet shards and a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from services.dataprep import prepare, quality, sources
from services.dataprep.quality import SideTokens
from services.dataprep.sample import RowLimit
from shared.artifacts import dropped_rows, sha256_of
from shared.basemodel import resolve_base_model
from shared.errors import ModelError
from shared.jobspec import JobSpec
from shared.messages import DatasetPrepared, PrepareDataset, TokenLengths
from shared.modeling import load_tokenizer, model_family, versions
from shared.prompting import Prompting, cut
from shared.stage import StageContext
from shared.store import Store

SHARD_ROWS = 50_000
SPLITS = ("train", "validation", "test")
SIDES = quality.SIDES


def handle(command: PrepareDataset, ctx: StageContext) -> DatasetPrepared:
    """Prepare the dataset once; a stored manifest makes a redelivery a no-op."""
    done = ctx.jobs.manifest(command.job_id, "prepare")
    if done is None:
        done = _prepare(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "prepare"))
    return DatasetPrepared(
        job_id=command.job_id,
        manifest=uri,
        counts=done["counts"],
        tokens={
            side: TokenLengths(**{k: lengths[k] for k in TokenLengths.model_fields})
            for side, lengths in done.get("lengths", {}).items()
        },
        dropped=dropped_rows(done.get("cleaning", {})),
        bad_rows_skipped=done.get("bad_rows_skipped", 0),
        warnings=done.get("warnings", []),
    )


def _prepare(command: PrepareDataset, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    data = spec.dataset
    source = sources.open_source(data, store=ctx.store, settings=ctx.settings)
    if source.columns:
        prepare.check_columns(list(source.columns), data, shown=source.shown)
        sources.check_types(source)
    base_model = resolve_base_model(
        spec.base_model, store=ctx.store, cache_dir=ctx.settings.cache_dir
    )
    tokenizer = load_tokenizer(base_model)
    family = model_family(base_model)
    try:
        prompting = Prompting.of(tokenizer, family.kind, data.chat_template)
    except ValueError as exc:
        raise ModelError(f"base_model {spec.base_model!r}: {exc}") from exc
    folder = ctx.scratch(command, "prepare")
    limit = RowLimit.of(data)
    batches = prepare.checked(source.batches(), data, shown=source.shown)
    staged = prepare.stage(
        limit.apply(batches, columns=data.template_columns, progress=ctx.progress),
        data,
        tokenizer,
        prompting,
        path=folder / "staged.parquet",
        shown=source.shown,
        progress=ctx.progress,
    )
    keys = pq.read_table(staged.path, columns=["key"]).column("key").to_pylist()
    assignment = prepare.assign_splits(
        keys, test_size=data.test_size, validation_size=data.validation_size, seed=data.seed
    )
    lengths = {side: quality.resolve_length(data, side, staged.lengths[side]) for side in SIDES}
    ctx.progress({"phase": "writing shards", "rows": staged.rows_kept}, force=True)
    writer = _ShardWriter(
        ctx.store,
        folder,
        ctx.jobs.stage_prefix(command.job_id, "prepare"),
        unk_id=tokenizer.unk_token_id,
    )
    limits = {side: lengths[side]["max_length"] for side in SIDES}
    tails = {"source": prompting.source_tail, "target": prompting.target_tail}
    _route(staged.path, assignment, writer, limits=limits, tails=tails)
    shards, tokens = writer.close()
    staged.path.unlink()
    split = {
        "test_size": data.test_size,
        "validation_size": data.validation_size,
        "seed": data.seed,
        "grouped_by": "prompt (case-insensitive)",
        "distinct_prompts": len(assignment),
        "shared_prompts": writer.shared_keys(),
    }
    manifest = _manifest(
        spec,
        source=source,
        limit=limit,
        staged=staged,
        shards=shards,
        tokens=tokens,
        lengths=lengths,
        tokenizer=tokenizer,
        prompting=prompting,
        split=split,
    )
    ctx.jobs.write_manifest(command.job_id, "prepare", manifest)
    return manifest


def _manifest(
    spec: JobSpec,
    *,
    source: sources.Source,
    limit: RowLimit,
    staged: prepare.Staged,
    shards: dict[str, list[dict[str, Any]]],
    tokens: dict[str, dict[str, SideTokens]],
    lengths: dict[str, dict[str, Any]],
    tokenizer: Any,
    prompting: Prompting,
    split: dict[str, Any],
) -> dict[str, Any]:
    """What data-prep did and what the data says about itself (written last)."""
    data = spec.dataset
    unknown, warnings = quality.summarise(
        lengths, tokens, unk_id=tokenizer.unk_token_id, unk_token=tokenizer.unk_token
    )
    limits = {side: lengths[side]["max_length"] for side in SIDES}
    return {
        "source": data.source,
        "inputs": sources.file_digests(source),
        "rows_read": limit.read,
        "sample": limit.record(),
        "cast_to_string": sorted(source.cast, key=data.template_columns.index),
        "bad_rows_skipped": source.bad_rows,
        "cleaning": dict(sorted(staged.cleaning.items())),
        "counts": {s: sum(x["rows"] for x in shards[s]) for s in SPLITS if shards.get(s)},
        "shards": shards,
        "lengths": lengths,
        "tokens": {
            s: {side: tokens[s][side].stats(limits[side]) for side in SIDES} for s in shards
        },
        "unknown_tokens": unknown,
        "warnings": warnings,
        "template": {"prompt": data.prompt_template, "target": data.target_template},
        "prompting": prompting.record(),
        "tokenizer": {
            "name": spec.base_model,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
        },
        "split": split,
        "versions": versions(),
    }


def _route(
    staged: Path,
    assignment: dict[bytes, str],
    writer: _ShardWriter,
    *,
    limits: dict[str, int],
    tails: dict[str, int],
) -> None:
    """Cut each staged row to the kept lengths and send it to its prompt's split."""
    for batch in pq.ParquetFile(staged).iter_batches(batch_size=sources.BATCH_ROWS):
        keys = batch.column("key").to_pylist()
        names = [assignment[k] for k in keys]
        table = pa.Table.from_batches([batch]).drop(["key"])
        full = {}
        for side, column in (("source", "input_ids"), ("target", "labels")):
            ids = table[column].to_pylist()
            full[side] = [len(x) for x in ids]
            kept = [cut(x, limits[side], tail=tails[side]) for x in ids]
            index = table.schema.get_field_index(column)
            table = table.set_column(index, column, pa.array(kept, table.schema.field(column).type))
        for split in SPLITS:
            chosen = [n == split for n in names]
            writer.add(
                split,
                table.filter(pa.array(chosen)),
                keys=[k for k, c in zip(keys, chosen, strict=True) if c],
                full={s: [n for n, c in zip(full[s], chosen, strict=True) if c] for s in SIDES},
            )


class _ShardWriter:
    """Writes each split's rows into numbered Parquet shards and uploads them."""

    def __init__(
        self, store: Store, folder: Path, prefix: str, *, unk_id: int | None = None
    ) -> None:
        self.store, self.folder, self.prefix, self.unk_id = store, folder, prefix, unk_id
        self.pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.tokens = {s: {side: SideTokens() for side in SIDES} for s in SPLITS}
        self.keys: dict[str, set[bytes]] = {s: set() for s in SPLITS}

    def add(
        self,
        split: str,
        table: pa.Table,
        *,
        keys: list[bytes],
        full: dict[str, list[int]] | None = None,
    ) -> None:
        """Queue a split's rows (cut; ``full``: their lengths before the cut)."""
        if table.num_rows == 0:
            return
        self.keys[split].update(keys)
        self.pending[split].append(table)
        for side, column in (("source", "input_ids"), ("target", "labels")):
            kept = table.column(column).to_pylist()
            lengths = full[side] if full else [len(ids) for ids in kept]
            self.tokens[split][side].add(lengths, kept, unk_id=self.unk_id)
        if sum(t.num_rows for t in self.pending[split]) >= SHARD_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        table = pa.concat_tables(self.pending[split]).cast(prepare.SHARD_SCHEMA)
        self.pending[split] = []
        path = self.folder / f"{split}-{len(self.shards[split]):05d}.parquet"
        pq.write_table(table, path)
        key = f"{self.prefix}/{path.name}"
        self.store.upload_file(path, key)
        self.shards[split].append(
            {"uri": self.store.uri(key), "rows": table.num_rows, "sha256": sha256_of(path)}
        )
        path.unlink()

    def shared_keys(self) -> int:
        """Prompt groups written to more than one split (the leakage check: 0 expected)."""
        return sum(
            len(self.keys[a] & self.keys[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]
        )

    def close(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, SideTokens]]]:
        """Flush every split; the shards and the token counts of each split written."""
        for split in SPLITS:
            if self.pending[split]:
                self._flush(split)
        kept = {s: v for s, v in self.shards.items() if v}
        return kept, {s: self.tokens[s] for s in kept}
