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


def test_a_manifest_without_its_prompting_record_keeps_the_stored_ids(t5):
    table = _table(t5[0], rows=2)
    served = served_prompts(table, {}, t5[0])
    assert served.column("served_ids").to_pylist() == table.column("input_ids").to_pylist()
    assert served.column("prompt_cut").to_pylist() == [False, False]
