"""Running one model over the held-out rows: per-row reference loss and generations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch

from services.evaluator.scoring import RowScores, score_rows
from shared.jobspec import DecodingSpec, EvaluationSpec

Progress = Callable[..., None]


def _batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


@torch.no_grad()
def row_losses(
    model: Any, tokenizer: Any, table: pa.Table, *, batch_size: int
) -> tuple[list[float], list[int]]:
    """Summed token cross-entropy of each row's reference (teacher forcing) and its length."""
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    model.eval()
    nll: list[float] = []
    tokens: list[int] = []
    for chunk in _batches(table.select(["input_ids", "labels"]), batch_size):
        batch = {k: v.to(model.device) for k, v in collator(chunk.to_pylist()).items()}
        logits = model(**batch).logits.float()
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        nll += losses.sum(dim=1).tolist()
        tokens += (labels != -100).sum(dim=1).tolist()
    return nll, tokens


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    table: pa.Table,
    *,
    decoding: DecodingSpec,
    batch_size: int,
    on_batch: Progress,
) -> list[str]:
    """The model's answers to the prompts of a table, in batches, decoded as served."""
    model.eval()
    outputs: list[str] = []
    for chunk in _batches(table.select(["input_ids"]), batch_size):
        ids = chunk.column("input_ids").to_pylist()
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        generated = model.generate(**batch, **decoding.generate_kwargs())
        outputs += [o.strip() for o in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        on_batch(len(outputs))
    return outputs


def run_model(
    model: Any,
    tokenizer: Any,
    table: pa.Table,
    *,
    spec: EvaluationSpec,
    decoding: DecodingSpec,
    progress: Progress,
    label: str,
) -> tuple[RowScores, list[str]]:
    """Per-row scores and generations of one model."""
    progress({"phase": f"{label}: reference loss", "rows": table.num_rows}, force=True)
    nll, tokens = row_losses(model, tokenizer, table, batch_size=spec.batch_size)
    if decoding.temperature > 0:
        torch.manual_seed(spec.seed)

    def on_batch(done: int) -> None:
        progress({"phase": f"{label}: generating", "rows_done": done, "rows": table.num_rows})

    predictions = generate(
        model, tokenizer, table, decoding=decoding, batch_size=spec.batch_size, on_batch=on_batch
    )
    references = table.column("target").to_pylist()
    return score_rows(predictions, references, nll=nll, tokens=tokens), predictions
