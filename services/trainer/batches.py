"""Length-grouped batches by both sides' lengths, and the padding they still carry.

transformers' ``group_by_length`` sorts by the input's length alone; in a glossary the
prompts ("What is X") are all about as long and the definitions are not, so batches grouped
that way pad the targets heavily (43-49% of the positions of the two shipped glossaries at
batch 16). Here rows are shuffled, cut into megabatches of 50 batches sorted by target
length, and those into runs of one to four batches (whichever pads least) sorted by source
length: 10-18% at batch 16, 7-14% at batch 8; the rest is the spread of two independent
lengths in batches of a fixed size. (transformers' ``BatchRebalanceSampler``, batches of
about equal cost within each effective batch, padded 21% and 27% of the two glossaries'
positions at an effective batch of 32 in four steps, where these batches pad 11% and 14%.)
A collator wrapper counts the padded positions of every training batch; the figure goes
into the training summary.

The order is drawn from the run's seed and the epoch (``EpochSeeded``), not from torch's
global generator: a run resumed in the middle of an epoch after the first then gets the
same order as the run it continues (with the global generator it drew another, training
on some rows of that epoch twice and on others not at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute
import torch
from transformers import Seq2SeqTrainer, TrainerCallback

from services.trainer.clipping import OneDeviceClipping

MEGABATCH = 50  # batches sorted together by target length (transformers' figure)
CHUNKS = (1, 2, 3, 4)  # batches sorted together by source length: the one that pads least


def side_lengths(table: pa.Table) -> tuple[list[int], list[int]]:
    """Source and target lengths of every row."""
    sources = pyarrow.compute.list_value_length(table.column("input_ids")).to_pylist()
    targets = pyarrow.compute.list_value_length(table.column("labels")).to_pylist()
    return sources, targets


class EpochSeeded:
    """A sampler whose order is drawn from a seed and the epoch: the data loader tells it
    the epoch (accelerate's ``set_epoch``), and ``EpochOf`` does where a loader wrapper does
    not pass that on."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_generator(self) -> torch.Generator:
        """A generator for this epoch's order (as accelerate's seedable sampler seeds)."""
        return torch.Generator().manual_seed(self.seed + self.epoch)


class EpochOf(TrainerCallback):
    """Tells a trainer's current sampler the epoch that begins (a resumed run begins in the
    checkpoint's, e.g. 1.4 -> epoch 1)."""

    def __init__(self, trainer: SeededSampling) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.current is not None:
            self.trainer.current.set_epoch(epoch_index(state.epoch or 0.0))


class SeededSampling:
    """A Trainer mixin: the ``EpochSeeded`` sampler it made (``current``), told each epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current: EpochSeeded | None = None
        self.add_callback(EpochOf(self))  # type: ignore[attr-defined]


def epoch_index(epoch: float) -> int:
    """The epoch a trainer state's fractional epoch is in (an epoch's end counts as the
    next one's start)."""
    return math.floor(epoch + 1e-6)


class TwoSidedSampler(EpochSeeded, torch.utils.data.Sampler[int]):
    """Row order for batches of ``batch`` rows alike in both lengths, the batches in a
    random order but the longest first (an out-of-memory shows at the first step), drawn
    from ``seed`` and the epoch."""

    def __init__(self, batch: int, sources: list[int], targets: list[int], seed: int = 0) -> None:
        self.batch, self.sources, self.targets, self.seed = batch, sources, targets, seed

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[int]:
        draw = self.epoch_generator()
        rows = torch.randperm(len(self.sources), generator=draw).tolist()
        mega = MEGABATCH * self.batch
        batches: list[list[int]] = []
        for start in range(0, len(rows), mega):
            by_target = sorted(rows[start : start + mega], key=self.targets.__getitem__)
            batches += min(
                (self._batches(by_target, chunk) for chunk in CHUNKS),
                key=lambda group: sum(map(self._tokens, group)),
            )
        # The DataLoader cuts this order every ``batch`` rows: only the last batch may be
        # short. The full ones go in a random order (sorted, every epoch would end on the
        # longest targets), the longest first.
        short = [b for b in batches if len(b) < self.batch]
        batches = [b for b in batches if len(b) == self.batch]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=draw).tolist()]
        longest = max(range(len(batches)), key=lambda b: self._tokens(batches[b]), default=0)
        if batches:
            batches[0], batches[longest] = batches[longest], batches[0]
        batches += short
        return iter([row for batch in batches for row in batch])

    def _batches(self, by_target: list[int], chunk: int) -> list[list[int]]:
        """Batches of rows sorted by target, re-sorted by source ``chunk`` batches at a time."""
        size = chunk * self.batch
        order = [
            row
            for at in range(0, len(by_target), size)
            for row in sorted(by_target[at : at + size], key=self.sources.__getitem__)
        ]
        return [order[i : i + self.batch] for i in range(0, len(order), self.batch)]

    def _tokens(self, batch: list[int]) -> int:
        return len(batch) * (
            max(self.sources[i] for i in batch) + max(self.targets[i] for i in batch)
        )


class LengthGroupedBySeed(TwoSidedSampler):
    """Length grouping for decoder-only rows (one sequence, one length): the two-sided
    grouping with an empty source side, so megabatches of 50 batches as for seq2seq.
    transformers' ``LengthGroupedSampler`` makes at least four megabatches, which cuts a
    glossary into small ones (297 rows at batch 32: 64 rows each) and left 44% of the
    positions padding; sorted 50 batches at a time, 10%."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, [0] * len(lengths), lengths, seed)


class CountingCollator:
    """A collator that counts real tokens and padded positions of the batches it makes."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.positions = {"source": 0, "target": 0}
        self.tokens = {"source": 0, "target": 0}

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collate(features)
        self.tokens["source"] += sum(len(f["input_ids"]) for f in features)
        self.tokens["target"] += sum(len(f["labels"]) for f in features)
        self.positions["source"] += batch["input_ids"].numel()
        self.positions["target"] += batch["labels"].numel()
        return batch

    def waste(self) -> dict[str, float | None]:
        """Share of padded positions by side and in all (None before any batch)."""
        share = {
            side: round(1 - self.tokens[side] / n, 4) if (n := self.positions[side]) else None
            for side in ("source", "target")
        }
        total = sum(self.positions.values())
        share["all"] = round(1 - sum(self.tokens.values()) / total, 4) if total else None
        return share


class GroupedTrainer(SeededSampling, OneDeviceClipping, Seq2SeqTrainer):
    """Seq2SeqTrainer whose length grouping sorts by target then source length, and whose
    evaluation batches are not counted as training padding."""

    def __init__(
        self, *args: Any, lengths: tuple[list[int], list[int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lengths = lengths

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        self.current = TwoSidedSampler(self.args.train_batch_size, *self.lengths, self.args.seed)
        return self.current

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        counting = self.data_collator
        self.data_collator = getattr(counting, "collate", counting)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = counting
