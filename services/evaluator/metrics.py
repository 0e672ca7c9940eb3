"""Held-out loss, generation and ROUGE-L for one model."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import torch

from shared.jobspec import EvaluationSpec


def _batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


@torch.no_grad()
def heldout_loss(model: Any, tokenizer: Any, table: pa.Table, *, batch_size: int) -> float:
    """Mean token-level cross-entropy of the references (teacher forcing)."""
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    model.eval()
    total, tokens = 0.0, 0
    for chunk in _batches(table.select(["input_ids", "labels"]), batch_size):
        batch = collator(chunk.to_pylist())
        batch = {k: v.to(model.device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, table: pa.Table, *, spec: EvaluationSpec) -> list[str]:
    """The model's answers to the prompts of a table."""
    model.eval()
    outputs: list[str] = []
    for chunk in _batches(table.select(["input_ids"]), spec.batch_size):
        batch = tokenizer.pad(
            {"input_ids": chunk.column("input_ids").to_pylist()}, return_tensors="pt"
        ).to(model.device)
        ids = model.generate(
            **batch,
            max_new_tokens=spec.max_new_tokens,
            num_beams=spec.num_beams,
            do_sample=False,
            no_repeat_ngram_size=spec.no_repeat_ngram_size or None,
        )
        outputs += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [o.strip() for o in outputs]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]


def evaluate(
    model: Any, tokenizer: Any, table: pa.Table, *, spec: EvaluationSpec
) -> dict[str, Any]:
    """Loss, perplexity, ROUGE-L and the generations of one model on a table."""
    loss = heldout_loss(model, tokenizer, table, batch_size=spec.batch_size)
    predictions = generate(model, tokenizer, table, spec=spec)
    scores = rouge_l(predictions, table.column("target").to_pylist())
    return {
        "loss": round(loss, 5),
        "perplexity": round(math.exp(min(loss, 50.0)), 3),
        "rouge_l": round(sum(scores) / len(scores), 5) if scores else 0.0,
        "empty_share": round(sum(not p for p in predictions) / max(len(predictions), 1), 4),
        "mean_output_words": round(
            sum(len(p.split()) for p in predictions) / max(len(predictions), 1), 2
        ),
        "predictions": predictions,
    }


def gate(
    base: dict[str, Any],
    tuned: dict[str, Any],
    *,
    min_rouge_l_gain: float,
    require_lower_loss: bool,
) -> tuple[bool, list[str]]:
    """Whether the tuned model beats the base as the spec demands; the reasons if not."""
    reasons = []
    if tuned["rouge_l"] < base["rouge_l"] + min_rouge_l_gain:
        reasons.append(
            f"ROUGE-L {tuned['rouge_l']:.4f} is below base {base['rouge_l']:.4f} "
            f"+ {min_rouge_l_gain}"
        )
    if require_lower_loss and not tuned["loss"] < base["loss"]:
        reasons.append(f"test loss {tuned['loss']:.4f} is not below base {base['loss']:.4f}")
    return not reasons, reasons
