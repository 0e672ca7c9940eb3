"""Evaluating and publishing a decoder-only model: the reference loss on the answer's tokens,
answers generated from left-padded prompts with the prompt stripped, and the merged export
that passes the preflight and loads in transformers 4.51.3."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import torch

from services.evaluator import metrics
from shared.artifacts import read_split
from shared.modeling import load_model, load_tokenizer


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return load_model(str(tiny_qwen)).eval(), load_tokenizer(str(tiny_qwen))


@pytest.fixture(scope="module")
def heldout_rows(trained_qwen):
    ctx = trained_qwen["ctx"]
    dataset = ctx.jobs.manifest("qwen-job", "prepare")
    return read_split(ctx.store, dataset, "test", cache_dir=ctx.settings.cache_dir).slice(0, 6)


def test_the_reference_loss_is_the_answers_alone(qwen, heldout_rows):
    model, tokenizer = qwen
    nll, tokens = metrics.row_losses(model, tokenizer, heldout_rows, batch_size=4)
    for i, row in enumerate(heldout_rows.to_pylist()):
        ids = torch.tensor([row["input_ids"] + row["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        answer = slice(len(row["input_ids"]) - 1, None)  # the positions predicting the answer
        expected = torch.nn.functional.cross_entropy(
            logits[answer], torch.tensor(row["labels"]), reduction="sum"
        )
        assert tokens[i] == len(row["labels"])
        assert math.isclose(nll[i], float(expected), rel_tol=1e-4)


def test_batched_answers_are_the_ones_given_one_at_a_time(qwen, heldout_rows, trained_qwen):
    from shared.jobspec import DecodingSpec

    model, tokenizer = qwen
    decoding = DecodingSpec(max_new_tokens=8)
    done = lambda table, size: metrics.generate(  # noqa: E731
        model, tokenizer, table, decoding=decoding, batch_size=size, on_batch=lambda n: None
    )
    batched = done(heldout_rows, 6)
    alone = [done(heldout_rows.slice(i, 1), 1)[0] for i in range(heldout_rows.num_rows)]
    assert batched == alone
    lengths = {len(r) for r in heldout_rows.column("input_ids").to_pylist()}
    assert len(lengths) > 1  # the batch was padded: on the left, or the answers would differ


def test_answers_leave_the_prompt_out(qwen):
    model, tokenizer = qwen
    prompt = tokenizer("<|im_start|>user\nWhat is Asthma<|im_end|>\n<|im_start|>assistant\n")
    table = pa.table({"input_ids": [prompt["input_ids"]]})
    from shared.jobspec import DecodingSpec

    (answer,) = metrics.generate(
        model, tokenizer, table, decoding=DecodingSpec(max_new_tokens=4), batch_size=1,
        on_batch=lambda n: None,
    )  # fmt: skip
    full = model.generate(
        input_ids=torch.tensor([prompt["input_ids"]]), max_new_tokens=4, do_sample=False
    )[0]
    new = tokenizer.decode(full[len(prompt["input_ids"]) :], skip_special_tokens=True).strip()
    assert answer == new and "What is Asthma" not in answer


def test_a_decoder_only_job_evaluates_and_publishes_an_importable_model(published_qwen):
    ctx, evaluated, event = published_qwen
    report = ctx.jobs.manifest("qwen-job", "evaluate")
    assert report["rows"] > 0 and evaluated.passed is report["gate"]["passed"] is True
    loss = report["metrics"]["loss"]
    assert loss["tuned"] < loss["base"]  # 6 steps on the answers lower their loss
    assert len(report["samples"]) > 0
    folder = ctx.store.path(ctx.store.key_of(event.location))
    manifest = ctx.jobs.manifest("qwen-job", "publish")
    assert manifest["preflight"]["model_type"] == "qwen3"
    assert manifest["merge"]["check"]["effect_share"] < 0.1  # bf16 keeps the adapter (limit 0.25)
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "- qwen3" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
