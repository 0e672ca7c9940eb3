"""Length grouping by both sides on real glossaries, and the padding it leaves."""

import json

import pyarrow as pa
import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from services.trainer.batches import (
    CountingCollator,
    LengthGroupedBySeed,
    TwoSidedSampler,
    side_lengths,
)
from tests.unit.services.test_dataprep_truth import SHARED_DATA, needs_glossaries


def _glossary_table(tokenizer, name):
    rows = [json.loads(line) for line in (SHARED_DATA / name).read_text().splitlines()]
    return pa.table(
        {
            "input_ids": tokenizer([f"What is {r['term']}" for r in rows])["input_ids"],
            "labels": tokenizer([r["definition"] for r in rows], truncation=True, max_length=128)[
                "input_ids"
            ],
        }
    )


def _waste(table, order, batch):
    sources = [len(x) for x in table.column("input_ids").to_pylist()]
    targets = [len(x) for x in table.column("labels").to_pylist()]
    real = padded = 0
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        real += sum(sources[j] + targets[j] for j in chunk)
        padded += len(chunk) * (max(sources[j] for j in chunk) + max(targets[j] for j in chunk))
    return 1 - real / padded


@needs_glossaries
@pytest.mark.parametrize(
    ("name", "batch", "at_most"),
    [
        ("cdc_plain_language_thesaurus.jsonl", 16, 0.20),  # short terms and short definitions
        ("symptom_ontology.jsonl", 8, 0.10),  # definitions a sentence or two long
    ],
)
def test_grouping_by_both_sides_halves_the_padding_of_a_glossary(tiny_model, name, batch, at_most):
    from transformers import AutoTokenizer

    table = _glossary_table(AutoTokenizer.from_pretrained(tiny_model), name)
    torch.manual_seed(0)
    ours = list(TwoSidedSampler(batch, *side_lengths(table)))
    torch.manual_seed(0)
    by_source = list(
        LengthGroupedSampler(batch, lengths=[len(x) for x in table.column("input_ids").to_pylist()])
    )
    torch.manual_seed(0)
    shuffled = torch.randperm(table.num_rows).tolist()
    assert sorted(ours) == list(range(table.num_rows))  # every row once
    assert _waste(table, ours, batch) < at_most
    assert _waste(table, ours, batch) < _waste(table, by_source, batch) / 2
    assert _waste(table, by_source, batch) <= _waste(table, shuffled, batch) + 0.02


def test_the_collator_counts_real_tokens_and_padded_positions(tiny_model):
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    counting = CountingCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    assert counting.waste() == {"source": None, "target": None, "all": None}
    counting(
        [{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [7, 8, 9, 1]}]
    )
    # source: 5 tokens in 2 x 3 positions; target: 6 tokens in 2 x 4 positions
    assert counting.waste() == {"source": round(1 / 6, 4), "target": 0.25, "all": round(3 / 14, 4)}


def test_batches_stay_whole_when_cut_every_batch_rows_and_change_order_each_epoch():
    """The DataLoader cuts the sampler's order every ``batch`` rows: only the last piece
    may be short, every piece is one planned batch, the longest comes first; each epoch has
    its own order, drawn from the seed and the epoch alone."""
    torch.manual_seed(0)
    sources = [int(x) for x in torch.randint(3, 20, (1003,))]
    targets = [int(x) for x in torch.randint(3, 300, (1003,))]
    sampler = TwoSidedSampler(16, sources, targets, seed=42)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(1003)) and first != second
    # The order is the seed's and the epoch's: torch's global generator does not move it.
    torch.manual_seed(7)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(TwoSidedSampler(16, sources, targets, seed=43)) != first
    pieces = [first[i : i + 16] for i in range(0, 1003, 16)]
    assert [len(p) for p in pieces[:-1]] == [16] * (len(pieces) - 1) and len(pieces[-1]) == 11
    spread = [max(targets[i] for i in p) - min(targets[i] for i in p) for p in pieces[:-1]]
    assert sorted(spread)[len(spread) // 2] < 30  # grouped: the median batch spans < 30 tokens
    tokens = [len(p) * (max(sources[i] for i in p) + max(targets[i] for i in p)) for p in pieces]
    assert tokens[0] == max(tokens[:-1])
    order = [max(targets[i] for i in p) for p in pieces[1:-1]]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # not a curriculum


def test_a_trainer_states_fractional_epoch_names_the_epoch_it_is_in():
    from services.trainer.batches import epoch_index

    assert [epoch_index(e) for e in (0.0, 0.5, 1.0, 1.4, 2.9999999, 3.0)] == [0, 0, 1, 1, 3, 3]


def _one_sided_waste(lengths, order, batch):
    pieces = [order[i : i + batch] for i in range(0, len(order), batch)]
    padded = sum(len(p) * max(lengths[i] for i in p) for p in pieces)
    return 1 - sum(lengths) / padded


@needs_glossaries
@pytest.mark.parametrize(("batch", "share"), [(8, 0.75), (32, 0.4)])  # measured: 0.48, 0.23
def test_decoder_rows_are_grouped_fifty_batches_at_a_time_not_in_four_megabatches(
    tiny_model, batch, share
):
    """A decoder-only row is the prompt and the answer in one sequence. transformers'
    sampler makes four megabatches at least: a glossary's 424 rows at batch 32 are sorted
    in megabatches of 96, which padded 22% of the positions here; sorted 50 batches at a
    time, 5% (at batch 8, 5.3% and 2.5%). The order is still every row once, the seed's and
    the epoch's."""
    from transformers import AutoTokenizer

    table = _glossary_table(AutoTokenizer.from_pretrained(tiny_model), "symptom_ontology.jsonl")
    lengths = [s + t for s, t in zip(*side_lengths(table), strict=True)]
    sampler = LengthGroupedBySeed(batch, lengths, seed=0)
    ours = list(sampler)
    theirs = list(LengthGroupedSampler(batch, lengths=lengths, generator=sampler.epoch_generator()))
    assert sorted(ours) == list(range(len(lengths)))
    ours_waste, theirs_waste = (_one_sided_waste(lengths, o, batch) for o in (ours, theirs))
    assert ours_waste < 0.08 and ours_waste < theirs_waste * share, (ours_waste, theirs_waste)
    sampler.set_epoch(1)
    assert list(sampler) != ours and sorted(sampler) == sorted(ours)
