"""Training a decoder-only model with trl's ``SFTTrainer`` on a prepared split.

Data-prep stores each row as the prompt's tokens (in the chat template, when the model has
one) and the answer's (ending with EOS). Here they become one sequence with a completion
mask, and trl's trainer computes the loss on the answer's tokens only (the prompt's are
labelled -100 from the mask): the model learns to answer, not to repeat questions.
With ``training.packing`` (on by default where transformers supports it) a batch's examples
are joined into one row without padding, each with position ids that start at 0: transformers
builds a block-diagonal causal mask from them (with ``use_cache=False``, which trl passes), so
no example attends to another. Otherwise batches are padded and grouped by length. The
collator counts the padding either way.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from services.trainer.lora import Plan
from shared.jobspec import TrainingSpec


def to_dataset(table: pa.Table) -> Any:
    """A datasets.Dataset of each row's prompt and answer as one sequence and the mask of
    the answer's positions."""
    import datasets

    prompts, answers = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    sequences, masks = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        sequences.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    return datasets.Dataset.from_dict({"input_ids": sequences, "completion_mask": masks})


class CountingCollator:
    """trl's collator, counting the real tokens and the padded positions of its batches."""

    def __init__(self, collate: Any) -> None:
        self.collate, self.tokens, self.positions = collate, 0, 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collate(features)
        self.tokens += sum(len(f["input_ids"]) for f in features)
        self.positions += batch["input_ids"].numel()
        return batch

    def waste(self) -> dict[str, float | None]:
        """Share of padded positions (one sequence a row: "all" only)."""
        share = round(1 - self.tokens / self.positions, 4) if self.positions else None
        return {"all": share}


def sft_trainer(
    model: Any,
    tokenizer: Any,
    splits: tuple[pa.Table, pa.Table | None],
    *,
    spec: TrainingSpec,
    plan: Plan,
    arguments: dict[str, Any],
    callbacks: list[Any],
) -> Any:
    """trl's SFTTrainer over the train (and validation) split, with the settings
    ``arguments`` holds (those the seq2seq trainer takes, as keyword arguments)."""
    train_table, eval_table = splits
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:  # Llama 3 has none: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    config = SFTConfig(
        **arguments,
        completion_only_loss=True,
        max_length=None,  # data-prep cut every row to the kept lengths already
        padding_free=plan.packing,
        dataset_num_proc=None,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
    )
    collator = None  # padding-free: trl's own (it takes no other), counted below
    if not plan.packing:
        collator = DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=8 if plan.device == "cuda" else None,
        )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=to_dataset(train_table),
        eval_dataset=to_dataset(eval_table) if eval_table is not None else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer
