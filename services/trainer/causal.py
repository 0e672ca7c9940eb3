"""Training a decoder-only model with trl's ``SFTTrainer`` on a prepared split.

Data-prep stores each row as the prompt's tokens (in the chat template, when the model has
one) and the answer's (ending with EOS). Here they become one sequence with a completion
mask, and trl's trainer computes the loss on the answer's tokens only (the prompt's are
labelled -100 from the mask): the model learns to answer, not to repeat questions.
With ``training.packing`` (on by default where transformers supports it) a batch's examples
are packed, longest first, into rows (``bins``), each example with position ids that start
at 0: transformers builds a block-diagonal causal mask from them (with ``use_cache=False``,
which trl passes), so no example attends to another. The rows' width is the one that costs
least by the model's shape: wider rows leave less padding at their ends, but attention's
work grows with a row's width (the kernels compute the whole square, the mask's blocks
included), which matters in a narrow model and hardly in a wide one; attention never costs
more than the padded batch's. Packed batches are drawn in random order (short and long
examples in one batch share rows; batches of alike lengths leave more padding at the rows'
ends). Otherwise batches are padded and grouped by length. The collator counts the padding
either way.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from services.trainer.lora import Plan


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


class PackingCollator:
    """A batch's examples packed into rows (``bins``), position ids restarting at each
    example, with trl's labels (the answer's)."""

    def __init__(self, pad_token_id: int, row_attention: float = 0.0) -> None:
        self.pad_token_id, self.row_attention = pad_token_id, row_attention

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = bins(sorted(features, key=lambda f: -len(f["input_ids"])), self.row_attention)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels, row_positions = [], [], []
            for f in row:
                row_ids += f["input_ids"]
                row_labels += f["labels"]  # trl's: -100 but on the answer's tokens
                row_positions += range(len(f["input_ids"]))
            pad = width - len(row_ids)  # the last example's positions go on: it alone sees them
            ids.append(row_ids + [self.pad_token_id] * pad)
            labels.append(row_labels + [-100] * pad)
            positions.append(
                row_positions + list(range(row_positions[-1] + 1, row_positions[-1] + 1 + pad))
            )
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
        }


def bins(features: list[dict[str, Any]], attention: float = 0.0) -> list[list[dict[str, Any]]]:
    """Examples, longest first, packed first-fit into rows of the width that costs least.

    R rows W wide cost R x W x (1 + ``attention`` x W): the weights' work a position, and
    attention's, which grows with the row's width (``Plan.row_attention``, from the model's
    shape). Widths from L (the longest: rows no wider than padding's) up by tenths to the
    whole batch in one row; those whose attention (R x W^2) would pass the padded batch's
    (n x L^2) are not taken. With ``attention`` 0, the fewest positions.
    """
    sizes = [len(f["input_ids"]) for f in features]
    ceiling = len(sizes) * sizes[0] ** 2
    best: tuple[float, list[list[dict[str, Any]]]] | None = None
    for capacity in _widths(sizes[0], sum(sizes)):
        rows, width = _first_fit(features, sizes, capacity)
        if len(rows) * width * width > ceiling:
            continue
        cost = len(rows) * width * (1 + attention * width)
        if best is None or cost < best[0]:
            best = (cost, rows)
    assert best is not None  # the longest's width always passes
    return best[1]


def _widths(longest: int, total: int) -> list[int]:
    """Row widths to try: the longest example's, up by tenths, and the whole batch's."""
    widths = [longest]
    while widths[-1] < total:
        widths.append(min(total, max(widths[-1] + 1, widths[-1] * 11 // 10)))
    return widths


def _first_fit(
    features: list[dict[str, Any]], sizes: list[int], capacity: int
) -> tuple[list[list[dict[str, Any]]], int]:
    """Each example into the first row with room for it: the rows and the widest's tokens."""
    rows: list[list[dict[str, Any]]] = []
    room: list[int] = []
    for f, size in zip(features, sizes, strict=True):
        slot = next((i for i, left in enumerate(room) if left >= size), None)
        if slot is None:
            rows.append([f])
            room.append(capacity - size)
        else:
            rows[slot].append(f)
            room[slot] -= size
    return rows, capacity - min(room)


def sft_trainer(
    model: Any,
    tokenizer: Any,
    splits: tuple[pa.Table, pa.Table | None],
    *,
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
        padding_free=False,  # trl's joins a whole batch into one row: ours packs rows
        dataset_num_proc=None,
        train_sampling_strategy="group_by_length" if plan.group_by_length else "random",
    )
    collator: Any = PackingCollator(tokenizer.pad_token_id, plan.row_attention)
    if not plan.packing:
        collator = DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=8 if plan.device == "cuda" else None,
        )
    trainer = _grouped(SFTTrainer)(
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


def _grouped(sft_trainer: type) -> type:
    """SFTTrainer whose length grouping draws its order from the seed and the epoch (see
    services.trainer.batches: a resumed run keeps the order of the run it continues)."""
    from services.trainer.batches import LengthGroupedBySeed, SeededSampling
    from services.trainer.clipping import OneDeviceClipping

    class GroupedSFTTrainer(SeededSampling, OneDeviceClipping, sft_trainer):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(ids) for ids in dataset["input_ids"]]
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            self.current = LengthGroupedBySeed(batch, lengths, self.args.seed)
            return self.current

    return GroupedSFTTrainer
