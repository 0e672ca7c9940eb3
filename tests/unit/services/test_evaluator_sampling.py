"""Generation as served: sampled answers whatever the batches, prompts data-prep cut."""

import json

import pyarrow as pa
import pytest

from services.evaluator import html_report, metrics
from services.evaluator.handler import build_report, served_prompts
from shared.jobspec import DecodingSpec, EvaluationSpec, parse_spec
from shared.modeling import load_model, load_tokenizer
from shared.prompting import Prompting, cut
from tests.factories import SAMPLE_DATA


@pytest.fixture(scope="module")
def t5(tiny_model):
    return load_tokenizer(str(tiny_model)), load_model(str(tiny_model)).eval()


def _table(tokenizer, rows=16):
    lines = SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:rows]
    terms = [json.loads(line) for line in lines]
    prompting = Prompting.of(tokenizer, "seq2seq")
    prompts = [f"What is {t['page_title']}" for t in terms]
    targets = [t["page_text"][:120] for t in terms]
    return pa.table(
        {
            "prompt": prompts,
            "target": targets,
            "input_ids": prompting.prompts(tokenizer, prompts),
            "labels": prompting.targets(tokenizer, targets),
        }
    )


def _answers(t5, table, *, batch_size, seed=0, temperature=0.8):
    tokenizer, model = t5
    spec = EvaluationSpec(batch_size=batch_size, seed=seed)
    decoding = DecodingSpec(max_new_tokens=12, temperature=temperature, top_p=0.95)
    _, answers, batches = metrics.run_model(
        model, tokenizer, table, spec=spec, decoding=decoding, progress=lambda *a, **k: None,
        label="x",
    )  # fmt: skip
    return answers, batches


def test_sampled_answers_do_not_depend_on_the_batch_size(t5):
    # The defect: one seed a model, then batches drawn from torch's global generator: a row's
    # tokens depended on the rows before it, so on the batch size "auto" took from the GPU's
    # free memory (and on an out-of-memory's halving).
    table = _table(t5[0])
    sixteen, batches = _answers(t5, table, batch_size=16)
    assert batches.generation == {16}
    for size in (8, 4, 3):
        assert _answers(t5, table, batch_size=size)[0] == sixteen, size
    assert _answers(t5, table, batch_size=16, seed=1)[0] != sixteen  # it samples: seed decides


def test_sampling_near_zero_temperature_is_greedy(t5):
    # each row's draw follows the processed distribution: cold enough, it is the argmax
    table = _table(t5[0], rows=8)
    greedy = _answers(t5, table, batch_size=8, temperature=0.0)[0]
    assert _answers(t5, table, batch_size=8, temperature=1e-4)[0] == greedy


def test_prompts_data_prep_cut_are_answered_in_full_and_counted(t5):
    # The defect: a prompt cut to max_source_length was answered from its cut ids while the
    # report showed the whole prompt and the served model was given it whole.
    tokenizer, model = t5
    table = _table(tokenizer, rows=4)
    prompting = Prompting.of(tokenizer, "seq2seq")
    full = table.column("input_ids").to_pylist()
    stored = [cut(ids, 4, tail=prompting.source_tail) for ids in full[:2]] + full[2:]
    table = table.set_column(2, "input_ids", pa.array(stored, type=pa.list_(pa.int32())))
    served = served_prompts(table, {"prompting": prompting.record()}, tokenizer)
    assert served.column("served_ids").to_pylist() == full
    assert served.column("prompt_cut").to_pylist() == [True, True, False, False]
    assert served.column("input_ids").to_pylist() == stored  # the loss: as trained
    decoding = DecodingSpec(max_new_tokens=8)

    def answers(ids):
        return metrics.generate(
            model, tokenizer, pa.table({"input_ids": ids}), decoding=decoding, batch_size=4,
            on_batch=lambda n: None,
        )  # fmt: skip

    spec = EvaluationSpec(batch_size=4)
    scores, given, _ = metrics.run_model(
        model, tokenizer, served, spec=spec, decoding=decoding, progress=lambda *a, **k: None,
        label="x",
    )  # fmt: skip
    assert given == answers(full) and given[:2] != answers(stored)[:2]
    report = build_report(
        served, (scores, given), (scores, given), training_log=[],
        spec=parse_spec({"name": "x1", "evaluation": {"bootstrap_samples": 100}}),
    )  # fmt: skip
    assert report["prompts_cut"] == 2
    assert [s["prompt_cut"] for s in report["samples"]] == [True, True, False, False]
    page = html_report.render(report, job_id="j")
    assert "2 of the 4 test prompts were cut by data-prep" in page
    assert page.count("(cut by data-prep: loss on the cut prompt)") == 2


def test_a_cut_prompt_is_answered_no_longer_than_the_served_model_reads(t5):
    """Answered in full, a prompt past what serving reads was no longer as served (the API
    cuts an encoder's at its tokenizer's length) and, past a decoder's context, failed the
    whole evaluation (an index error; on a GPU a device-side assert)."""
    tokenizer, _ = t5
    table = _table(tokenizer, rows=3)
    prompting = Prompting.of(tokenizer, "seq2seq")
    full = table.column("input_ids").to_pylist()
    stored = [cut(ids, 4, tail=prompting.source_tail) for ids in full]
    table = table.set_column(2, "input_ids", pa.array(stored, type=pa.list_(pa.int32())))
    limit = sorted(len(ids) for ids in full)[1]  # the shortest fits, the others do not
    record = {"prompting": prompting.record()}
    as_api = [
        f if len(f) <= limit else tokenizer(p, truncation=True, max_length=limit)["input_ids"]
        for f, p in zip(full, table.column("prompt").to_pylist(), strict=True)
    ]
    encoder = served_prompts(table, record, tokenizer, limit=limit, encoder=True)
    assert encoder.column("served_ids").to_pylist() == as_api
    assert max(len(ids) for ids in as_api) == limit
    decoder = served_prompts(table, record, tokenizer, limit=limit, encoder=False)
    assert decoder.column("served_ids").to_pylist() == [
        f if len(f) <= limit else s for f, s in zip(full, stored, strict=True)
    ]
    assert decoder.column("prompt_cut").to_pylist() == [True, True, True]


def test_a_manifest_without_its_prompting_record_keeps_the_stored_ids(t5):
    table = _table(t5[0], rows=2)
    served = served_prompts(table, {}, t5[0])
    assert served.column("served_ids").to_pylist() == table.column("input_ids").to_pylist()
    assert served.column("prompt_cut").to_pylist() == [False, False]


@pytest.mark.parametrize("set_by_model", [{}, {"top_k": 5}, {"min_p": 0.2}])
def test_sampled_tokens_come_from_the_distribution_generate_samples(t5, set_by_model):
    """The evaluator's per-row draws left out what generate(do_sample=True) applies on its
    own: transformers' top_k of 50 for a model whose generation config sets none (Flan-T5),
    the model's own min_p: it scored answers from the whole vocabulary's tail, which the
    served model never gives. One step, 600 draws each way from one prompt: every token
    drawn is one the served sampling may give."""
    import copy

    import torch

    tokenizer, model = t5
    model = copy.deepcopy(model)
    for name, value in set_by_model.items():
        setattr(model.generation_config, name, value)
    prompt = torch.tensor(_table(tokenizer, rows=1).column("input_ids").to_pylist())
    start = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        logits = model(input_ids=prompt, decoder_input_ids=start).logits[0, -1] / 1.3
    allowed = set(torch.topk(logits, set_by_model.get("top_k", 50)).indices.tolist())
    if "min_p" in set_by_model:
        probs = torch.softmax(logits, dim=-1)
        allowed &= set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    batch = {
        "input_ids": prompt.repeat(600, 1),
        "attention_mask": torch.ones_like(prompt).repeat(600, 1),
    }
    decoding = DecodingSpec(max_new_tokens=1, temperature=1.3, top_p=1.0)
    torch.manual_seed(0)
    served = set(model.generate(**batch, **decoding.generate_kwargs())[:, -1].tolist())
    sampled = metrics.row_sampling(model, decoding, rows=list(range(600)), seed=0)
    drawn = set(model.generate(**batch, **sampled)[:, -1].tolist())
    assert served <= allowed and drawn <= allowed
    assert len(drawn) >= min(len(allowed), 2)  # it samples
