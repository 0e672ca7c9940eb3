"""Data-prep for a decoder-only base model: prompts in the model's chat template (or as they
are), targets ending with EOS, cuts that keep the template's opening of the answer, and the
format recorded for the stages after it."""

from __future__ import annotations

import pytest

from services.cli.tinycausal import build_tiny_causal
from services.dataprep.handler import handle
from shared.modeling import load_tokenizer
from shared.prompting import Prompting, cut
from tests.factories import SAMPLE_DATA, make_spec
from tests.unit.services.test_dataprep import _command
from tests.unit.services.test_dataprep_truth import (
    GLOSSARY,
    SHARED_DATA,
    _all_rows,
    needs_glossaries,
)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_causal("qwen3", tmp_path_factory.mktemp("q") / "m", data_file=SAMPLE_DATA)


def _prepared(ctx, model, **dataset):
    handle(_command(ctx, make_spec(model, dataset=dataset)), ctx)
    return ctx.jobs.manifest("job-1", "prepare")


def test_prompts_are_chat_turns_and_targets_end_with_eos(ctx, tiny_qwen):
    manifest = _prepared(ctx, tiny_qwen, max_target_length=48)
    tokenizer = load_tokenizer(str(tiny_qwen))
    prompting = Prompting.from_record(manifest["prompting"])
    assert manifest["prompting"] == {
        "kind": "causal",
        "chat_template": True,
        "source_tail": prompting.source_tail,
        "target_tail": 1,
        "harmony": False,  # Qwen's chat format: no channels
    }
    opening = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    opening = opening["input_ids"]
    rows = _all_rows(ctx, manifest)
    assert len(rows) == sum(manifest["counts"].values()) > 100
    limit = manifest["lengths"]["source"]["max_length"]  # auto: the p99, so a few are cut
    for row in rows:
        full = prompting.prompts(tokenizer, [row["prompt"]])[0]
        assert row["input_ids"] == cut(full, limit, tail=prompting.source_tail)
        assert row["input_ids"][-len(opening) :] == opening
        assert row["labels"][-1] == tokenizer.eos_token_id and len(row["labels"]) <= 48
    long = [r for r in rows if len(r["labels"]) == 48]
    assert long and manifest["lengths"]["target"]["truncated_share"] > 0  # long definitions


def test_a_cut_prompt_keeps_the_opening_of_the_answer(ctx, tiny_qwen):
    manifest = _prepared(ctx, tiny_qwen, max_source_length=12, max_target_length=16)
    tokenizer = load_tokenizer(str(tiny_qwen))
    tail = manifest["prompting"]["source_tail"]
    rows = _all_rows(ctx, manifest)
    shortened = [r for r in rows if len(r["input_ids"]) == 12]
    assert shortened, "no prompt was long enough to be cut"
    for row in shortened:
        full = Prompting.from_record(manifest["prompting"]).prompts(tokenizer, [row["prompt"]])[0]
        assert len(full) > 12 and row["input_ids"] == full[: 12 - tail] + full[-tail:]


def test_chat_template_none_takes_the_prompt_as_it_is(ctx, tiny_qwen):
    manifest = _prepared(ctx, tiny_qwen, chat_template="none", max_target_length=32)
    tokenizer = load_tokenizer(str(tiny_qwen))
    assert manifest["prompting"]["chat_template"] is False
    limit = manifest["lengths"]["source"]["max_length"]
    for row in _all_rows(ctx, manifest):
        assert row["input_ids"] == cut(tokenizer(row["prompt"])["input_ids"], limit, tail=0)


@needs_glossaries
def test_a_real_glossary_prepares_for_a_llama_model(ctx, tmp_path):
    llama = build_tiny_causal("llama", tmp_path / "llama", data_file=SAMPLE_DATA)
    source = str(SHARED_DATA / "symptom_ontology.jsonl")
    manifest = _prepared(ctx, llama, source=source, max_target_length=64, **GLOSSARY)
    tokenizer = load_tokenizer(str(llama))
    rows = _all_rows(ctx, manifest)
    assert sum(manifest["counts"].values()) == len(rows) > 400
    assert all(r["input_ids"].count(tokenizer.bos_token_id) == 1 for r in rows)
    assert all(r["labels"][-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>") for r in rows)
